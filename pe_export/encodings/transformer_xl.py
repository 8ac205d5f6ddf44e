"""Transformer-XL relative attention (Dai et al. 2019, arXiv 1901.02860, §3.3): u/v biases, a sinusoidal
relative table R projected by W_r, and the relative shift.

Must match kimiyoung/transformer-xl pytorch/mem_transformer.py (commit 81b1b19, read in full; the same
functions at 0110210): `RelPartialLearnableMultiHeadAttn.forward` (attn_type 0), `RelMultiHeadAttn._rel_shift`,
`PositionalEmbedding`, and how `MemTransformerLM._forward` builds `pos_seq`, `clamp_len` and the decoder mask.

The keys are the memory followed by the current segment (K = mem + Q): key j sits at position j and
query i at (K - Q) + i. For head h, with d = (K - Q + i) - j clamped to `clamp_len` (when > 0),

    score_ij = ((q_i + u) . k_j + (q_i + v) . (W_r R[d])_h) / sqrt(D)      AC + BD
    R[d]     = [sin(d * inv_freq) | cos(d * inv_freq)],  inv_freq = 1 / 10000^(arange(0, d_model, 2) / d_model)

(the concatenated sinusoidal layout), keys after their query (j > K - Q + i) masked with -inf as TXL's
`triu(ones(qlen, klen), 1 + mlen)`, and output = softmax(score) . value. The layer's q/k/v/o projections
and layer norm lie outside the positional encoding and outside the graph.

The graph computes BD as TXL does: (q + v) against every row of W_r R[pos_seq], pos_seq = K-1 ... 0,
then the zero-column / reshape / drop-first-row / reshape shift, which is valid only for K >= Q.
W_r R (input-independent) is precomputed in float64 at export time for distances [0, rows), rows =
min(max_positions, clamp_len + 1) (or max_positions without a clamp), and cast once to the export dtype.
K > max_positions or K < Q sends the table read past its end, so the graph fails on every runtime.
`same_length` (TXL's evaluation-time mask that also hides keys more than mem_len back) is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pe_export import weights
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.bounds import attention_magnitude, softmax_np
from pe_export.encodings.contracts import contract
from pe_export.encodings.probes import attention_probes
from pe_export.encodings.size import check_size
from pe_export.encodings.table_reads import take

# Seeded weights: u and v like q (N(0, 1)); W_r as nn.Linear(d_model, H * D) so that W_r R ~ N(0, 1/2).
SCALES = {"r_w_bias": 1.0, "r_r_bias": 1.0}


@dataclass(frozen=True, kw_only=True)
class TransformerXLParams(weights.LearnedWeights):
    heads: int
    head_dim: int
    d_model: int  # width of the sinusoidal R, the input of r_net
    clamp_len: int = 0  # relative distances above it read R[clamp_len]; 0 = no clamp (TXL: `if clamp_len > 0`)
    mem_len: int = 0  # the memory length the model was trained with (recorded from its config)
    max_positions: int = 512  # the largest key length K (memory + segment) the graph accepts
    same_length: bool = False

    def __post_init__(self):
        self.check_weights(supported=False)
        smallest = {"heads": 1, "head_dim": 1, "d_model": 2, "max_positions": 1, "clamp_len": 0, "mem_len": 0}
        for name, least in smallest.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (R is [sin | cos] of d_model / 2 frequencies), got {self.d_model}")
        # the (rows, H, D) table (rows <= P); verification's full-memory probe (K = P keys, 8 queries): keys
        # and values (B, H, P, D) in float32 and float64, and W_r R[d] of each pair, (8, P, H, D) float64, twice
        HD = self.heads * self.head_dim
        check_size(self.max_positions, stored=4 * HD * rows(self) / self.max_positions, working=176 * HD)
        if self.same_length:
            raise ValueError(
                "same_length=True (Transformer-XL's evaluation mask that also hides keys more than mem_len back) "
                "is not supported; export with same_length false"
            )


def rows(p: TransformerXLParams) -> int:
    """Rows of the relative table: distances [0, rows) (every distance above clamp_len reads row clamp_len)."""
    return min(p.max_positions, p.clamp_len + 1) if p.clamp_len > 0 else p.max_positions


def learned(p: TransformerXLParams) -> dict[str, np.ndarray]:
    """float64 r_w_bias u (H, D), r_r_bias v (H, D) and r_net weight W_r (H * D, d_model)."""
    shapes = {
        "r_w_bias": (p.heads, p.head_dim),
        "r_r_bias": (p.heads, p.head_dim),
        "r_net": (p.heads * p.head_dim, p.d_model),
    }
    return weights.random(p.weights_seed, shapes, SCALES | {"r_net": 1.0 / math.sqrt(p.d_model)})


def sinusoid(d_model: int, distances: np.ndarray) -> np.ndarray:
    """float64 (N, d_model) [sin | cos] rows of TXL's PositionalEmbedding at the given distances."""
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # (d_model/2,)
    angles = np.asarray(distances, dtype=np.float64)[:, None] * inv_freq[None, :]  # (N, d_model/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def projected_table(p: TransformerXLParams) -> np.ndarray:
    """float64 (rows, H, D) W_r R[d] for d in [0, rows): TXL's r_head_k by distance."""
    w = learned(p)["r_net"]
    return (sinusoid(p.d_model, np.arange(rows(p))) @ w.T).reshape(rows(p), p.heads, p.head_dim)


def module(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(TransformerXLParams, spec)
    P, N = p.max_positions, rows(p)
    dtype = torch_dtype(spec.dtype)
    w = learned(p)

    class TransformerXLAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("r_w_bias", torch.from_numpy(w["r_w_bias"]).to(dtype)[:, None])  # (H, 1, D)
            self.register_buffer("r_r_bias", torch.from_numpy(w["r_r_bias"]).to(dtype)[:, None])  # (H, 1, D)
            self.register_buffer("r_head_k", torch.from_numpy(projected_table(p)).to(dtype))  # (rows, H, D)

        def forward(self, query, key, value):  # (B, H, Q, D), (B, H, K, D), (B, H, K, D) -> (B, H, Q, D)
            B, H, Q, D = query.shape
            K = key.shape[2]
            key_pos = torch.arange(K, device=query.device)  # (K,)
            query_pos = torch.arange(Q, device=query.device) + (K - Q)  # (Q,) after the memory
            pos_seq = (K - 1) - key_pos  # (K,) TXL's descending pos_seq: distance of query K-1 to key j
            row = pos_seq.clamp(max=p.clamp_len) if p.clamp_len > 0 else pos_seq
            # K > max_positions (a distance past the table) or K < Q (a query before position 0, where the
            # shift below would read the wrong rows): read past the table, so every runtime fails.
            bad = (pos_seq >= P) | (query_pos[:1] < 0)  # (K,)
            r_head_k = take(self.r_head_k, torch.where(bad, torch.full_like(row, N), row))  # (K, H, D); full: see guard

            ac = (query + self.r_w_bias) @ key.transpose(-1, -2)  # (B, H, Q, K)
            bd = (query + self.r_r_bias) @ r_head_k.permute(1, 2, 0)  # (B, H, Q, K), column r: distance K-1-r
            # TXL's _rel_shift: prepend a zero column, read the (Q, K+1) block as (K+1, Q), drop the first
            # row, read it back as (Q, K): row i shifts left by Q-1-i, so column j holds distance K-Q+i-j.
            bd = torch.cat([torch.zeros_like(bd[..., :1]), bd], dim=-1)  # (B, H, Q, K+1), as TXL's zero_pad
            bd = bd.reshape(B, H, K + 1, Q)[:, :, 1:].reshape(B, H, Q, K)  # (B, H, Q, K)

            score = (ac + bd) * (1.0 / math.sqrt(p.head_dim))  # (B, H, Q, K)
            score = score.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
            # Softmax in float32 for fp16/bf16 accuracy (TXL's runs in the score's dtype), as attention.py's layer.
            return torch.softmax(score.float(), dim=-1).to(value.dtype) @ value  # (B, H, Q, D)

    return TransformerXLAttention().eval()


# ------------------------------------------------------------------------------------------------
# float64 reference, from the formula (the distance of each query/key pair, not the shift)


def logits_np(p: TransformerXLParams, query: np.ndarray, key: np.ndarray):
    """float64 logits (B, H, Q, K), -inf after each query, and logit_abs: the sum of the absolute
    values of the 2D products that make up each logit, times the scale."""
    Q, K = query.shape[2], key.shape[2]
    if K > p.max_positions:
        raise IndexError(f"key length {K} out of range: at most max_positions {p.max_positions}")
    if K < Q:
        raise IndexError(
            f"key length {K} is shorter than query length {Q}: keys are the memory followed by the queries"
        )
    w = learned(p)
    q, k = query.astype(np.float64), key.astype(np.float64)
    u, v = w["r_w_bias"][None, :, None], w["r_r_bias"][None, :, None]  # (1, H, 1, D)
    dist = (K - Q + np.arange(Q))[:, None] - np.arange(K)[None, :]  # (Q, K), query position - key position
    causal = dist >= 0
    d = np.where(causal, dist, 0)
    if p.clamp_len > 0:
        d = np.minimum(d, p.clamp_len)
    w_r = w["r_net"].reshape(p.heads, p.head_dim, p.d_model)  # (H, D, d_model)
    r = np.einsum("nm,hdm->nhd", sinusoid(p.d_model, np.arange(d.max() + 1)), w_r)[
        d
    ]  # (Q, K, H, D): W_r R[d] of each pair
    scale = 1.0 / math.sqrt(p.head_dim)
    ac = np.einsum("bhqd,bhkd->bhqk", q + u, k)
    bd = np.einsum("bhqd,qkhd->bhqk", q + v, r)
    logits = np.where(causal, (ac + bd) * scale, -np.inf)
    logit_abs = np.einsum("bhqd,bhkd->bhqk", np.abs(q + u), np.abs(k)) + np.einsum(
        "bhqd,qkhd->bhqk", np.abs(q + v), np.abs(r)
    )
    logit_abs *= scale
    return logits, logit_abs


def reference(spec, inputs):
    p = parse(TransformerXLParams, spec)
    logits, _ = logits_np(p, inputs["query"], inputs["key"])
    return softmax_np(logits) @ inputs["value"].astype(np.float64)  # (B, H, Q, D)


def magnitude(spec, inputs):
    p = parse(TransformerXLParams, spec)
    logits, logit_abs = logits_np(p, inputs["query"], inputs["key"])
    value_abs = np.abs(inputs["value"].astype(np.float64))
    return attention_magnitude(softmax_np(logits), value_abs, logit_abs, terms=2 * p.head_dim + 2)  # AC and BD


def probes(spec, rng, batch=2):
    """The shared attention cases (keys at [0, K), queries the last Q) plus a few queries over a memory
    that fills the table (K = max_positions): every distance, and the clamp where clamp_len < K - 1."""
    from pe_export.dtypes import numpy_dtype

    p = parse(TransformerXLParams, spec)
    P, H, D = p.max_positions, p.heads, p.head_dim
    cases = attention_probes(spec, rng, batch, P, H, D, positions=False)
    Q = min(P, 8)
    full = {
        n: rng.standard_normal((batch, H, length, D), dtype=np.float32).astype(numpy_dtype(spec.dtype))
        for n, length in (("query", Q), ("key", P), ("value", P))
    }
    return cases + [("full", full)]


def locate(spec, inputs, at) -> str:
    b, h, i, d = at
    Q, K = inputs["query"].shape[2], inputs["key"].shape[2]
    return f"batch {b}, head {h}, query {i} (position {K - Q + i} of {K} keys), dim {d}"


ENCODINGS.register("transformer-xl")(
    Encoding(
        name="transformer-xl",
        params=TransformerXLParams,
        module=module,
        reference=reference,
        magnitude=magnitude,
        **{**contract("attention", TransformerXLParams, positions=False), "probes": probes, "locate": locate},
        reference_impl="kimiyoung/transformer-xl@81b1b19 pytorch/mem_transformer.py "
        "RelPartialLearnableMultiHeadAttn, _rel_shift",
    )
)
