"""DeBERTa disentangled attention with log buckets (He et al., DeBERTa arXiv 2006.03654; DeBERTa-v3
arXiv 2111.09543), the v2/v3 form.

Must match transformers 5.23 `models/deberta_v2/modeling_deberta_v2.py`: `make_log_bucket_position`,
`build_relative_position`, `DisentangledSelfAttention.forward` and `disentangled_attention_bias`, with the
relative embeddings LayerNorm'ed as `DebertaV2Encoder.get_rel_embedding` does (`norm_rel_ebd` "layer_norm").
For query position i and key position j (rel = i - j, query minus key: the opposite sign of T5):

    bucket   = make_log_bucket_position(rel): rel itself for |rel| <= mid = position_buckets // 2, else
               sign(rel) * (mid + ceil(log(|rel| / mid) / log((max_relative_positions - 1) / mid) * (mid - 1)))
    r_ij     = clamp(bucket + att_span, 0, 2 att_span - 1)       att_span = position_buckets (or
                                                                  max_relative_positions without buckets)
    R        = LayerNorm(rel_embeddings)                          (2 att_span, H*D), shared by all layers
    pos_key  = R W_k^T + b_k,  pos_query = R W_q^T + b_q          the content projections (share_att_key)
                                                                  or pos_key_proj / pos_query_proj
    logit_ij = (q_i . k_j + [c2p] q_i . pos_key[r_ij] + [p2c] k_j . pos_query[r_ij]) / sqrt(D * (1 + [c2p] + [p2c]))
    out_i    = sum_j softmax_j(logit_ij) v_j                      (no mask)

p2c reads row r_ij, the same row as c2p: that is what the code computes (`clamp(-r_pos + att_span)` on
the key-major matrix, then transposed), as does every copy of microsoft/DeBERTa's code (transformers'
DeBERTa v1 too); the paper's Algorithm 1 writes delta(j, i) (key minus query) instead. The code wins:
checkpoints were trained with it.

Q != K (decoding with a cache): transformers' p2c then rebuilds key-vs-key positions (`build_rpos`, which
also passes position_buckets and max_relative_positions swapped) into a (K, K) term and raises on the shape
mismatch, for Q = 1 too; its c2p alone takes Q != K. Here p2c is defined by the positions for any Q and K,
as above: the output of the last Q queries is the last Q rows of the K x K layer (there is no mask), which
is transformers' output wherever Q = K (positions 0..K-1, or any common shift of them).

Export: positions lie in [0, max_positions) = [0, P), so the clamped row r of every rel in (-P, P) is
computed at export time into a (2P - 1,) index table: no float log in the graph. transformers computes the
bucket in float32 (torch.log, torch.ceil); the table does the same float32 arithmetic, because float64 (as
microsoft/DeBERTa's NumPy original does) lands in the next bucket where the quotient is an exact integer,
e.g. rel 128 with buckets 128 and max_relative_positions 513. pos_key and pos_query do not depend on the
inputs: they are computed in float64 at export time (pos_query already divided by the scale) and stored.
The graph: a guarded Gather for r, q k^T, q pos_key^T and k pos_query^T as MatMuls, a Gather each picking
column r_ij of the (B, H, Q|K, 2 att_span) products (on their flattened last two axes), softmax, MatMul with v.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from pe_export import weights
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.bounds import attention_magnitude, softmax_np
from pe_export.encodings.contracts import contract
from pe_export.encodings.probes import attention_probes
from pe_export.encodings.size import check_size
from pe_export.encodings.table_reads import check_positions, guard, take

POS_ATT_TYPES = ("c2p", "p2c")


@dataclass(frozen=True, kw_only=True)
class DebertaParams(weights.LearnedWeights):
    heads: int
    head_dim: int = 64  # hidden size = heads * head_dim
    position_buckets: int = 256  # 0 or less: no log buckets
    max_relative_positions: int = -1  # less than 1: max_position_embeddings (as transformers)
    max_position_embeddings: int = 512
    pos_att_type: str = "p2c|c2p"  # "|"-separated subset of c2p, p2c (transformers' config string)
    share_att_key: bool = True  # positions projected by the content key_proj / query_proj
    norm_rel_ebd: bool = True  # LayerNorm on the relative embeddings (config norm_rel_ebd "layer_norm")
    layer_norm_eps: float = 1e-7  # DebertaV2Config.layer_norm_eps default, and deberta-v3's config value
    max_positions: int = 512  # positions accepted by the graph: [0, max_positions)

    def __post_init__(self):
        self.check_weights(supported=False)
        for name in ("heads", "head_dim", "max_position_embeddings", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("position_buckets", "max_relative_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.position_buckets == 1:  # mid = 0: log(|rel| / 0)
            raise ValueError("position_buckets must be >= 2, or <= 0 for no log buckets, got 1")
        mid, max_rel = self.position_buckets // 2, relative_span(self)
        if self.position_buckets > 0 and max_rel - 1 <= mid:  # log((max_rel - 1) / mid) must be > 0
            used = f" (max_position_embeddings, as max_relative_positions is {self.max_relative_positions})"
            raise ValueError(
                f"log buckets need max_relative_positions > position_buckets // 2 + 1 = {mid + 1}, got {max_rel}"
                + (used if self.max_relative_positions < 1 else "")
            )
        if not isinstance(self.pos_att_type, str):
            raise ValueError(f"pos_att_type must be a string such as 'p2c|c2p', got {self.pos_att_type!r}")
        types = terms(self)
        if not types or any(t not in POS_ATT_TYPES for t in types) or len(set(types)) != len(types):
            raise ValueError(
                f"pos_att_type must be 'c2p', 'p2c' or 'p2c|c2p' (each at most once), got {self.pos_att_type!r}"
            )
        # a (2P - 1,) int64 row table; verification reads every distance: keys and values (B, H, P, D) in
        # float32 and float64, and for p2c the (B, H, P, 2 att_span) float64 products, twice (value and bound)
        span = 2 * att_span(self) if "p2c" in types else 0
        check_size(self.max_positions, stored=16, working=48 * self.heads * self.head_dim + 32 * self.heads * span)
        for name in ("share_att_key", "norm_rel_ebd"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
            raise ValueError(f"layer_norm_eps must be a finite number > 0, got {eps!r}")


def terms(p: DebertaParams) -> list[str]:
    """The position terms, parsed as DebertaV2Config does: lower case, split on '|', stripped."""
    return [t.strip() for t in p.pos_att_type.lower().split("|")]


def relative_span(p: DebertaParams) -> int:
    """max_relative_positions as used: transformers takes max_position_embeddings for values below 1."""
    return p.max_relative_positions if p.max_relative_positions >= 1 else p.max_position_embeddings


def att_span(p: DebertaParams) -> int:
    """Half the number of relative embedding rows (`pos_ebd_size`)."""
    return p.position_buckets if p.position_buckets > 0 else relative_span(p)


def scale(p: DebertaParams) -> float:
    """sqrt(D * scale_factor), scale_factor = 1 + [c2p] + [p2c]."""
    return math.sqrt(p.head_dim * (1 + len(terms(p))))


def log_bucket(p: DebertaParams, relative_position: np.ndarray) -> np.ndarray:
    """int64 `make_log_bucket_position(rel, position_buckets, max_relative_positions)`, in float32
    arithmetic as transformers runs it (rel itself without log buckets)."""
    rel = np.asarray(relative_position, dtype=np.int64)
    if p.position_buckets <= 0:
        return rel
    mid = p.position_buckets // 2
    f32 = np.float32
    abs_pos = np.maximum(np.abs(rel), mid).astype(f32)  # the log branch is taken only for |rel| > mid: no log(0)
    ratio = np.log(abs_pos / f32(mid)) / np.log(f32((relative_span(p) - 1) / mid)) * f32(mid - 1)  # float32
    log_pos = np.ceil(ratio).astype(np.int64) + mid
    return np.where(np.abs(rel) <= mid, rel, np.sign(rel) * log_pos)


def relative_index(p: DebertaParams, relative_position: np.ndarray) -> np.ndarray:
    """int64 row r = clamp(bucket(rel) + att_span, 0, 2 att_span - 1) of pos_key and pos_query; the clamp
    saturates the buckets that keep growing past +-(att_span - 1) (e.g. rel 1000 -> 317 with 256 buckets)."""
    span = att_span(p)
    return np.clip(log_bucket(p, relative_position) + span, 0, 2 * span - 1)


def learned(p: DebertaParams) -> dict[str, np.ndarray]:
    """float64 seeded weights: rel_embeddings (2 att_span, H*D), the LayerNorm's weight and bias (H*D,),
    and the four projections used on positions (H*D, H*D) with biases (H*D,). All are drawn whatever the
    configuration, so that one seed gives the same tensors to every configuration of the same sizes."""
    hidden = p.heads * p.head_dim
    shapes = {"rel_embeddings": (2 * att_span(p), hidden), "layer_norm_weight": (hidden,), "layer_norm_bias": (hidden,)}
    for proj in ("query_proj", "key_proj", "pos_query_proj", "pos_key_proj"):
        shapes |= {f"{proj}_weight": (hidden, hidden), f"{proj}_bias": (hidden,)}
    scales = {name: (1 / math.sqrt(hidden) if name.endswith("_weight") else 0.1) for name in shapes} | {
        "rel_embeddings": 1.0
    }
    w = weights.random(p.weights_seed, shapes, scales)
    w["layer_norm_weight"] = w["layer_norm_weight"] + 1.0  # around nn.LayerNorm's initial 1
    return w


@functools.lru_cache(maxsize=8)
def position_projections(p: DebertaParams) -> tuple[np.ndarray, np.ndarray]:
    """float64 pos_key and pos_query, each (2 att_span, H, D), read-only: the (LayerNorm'ed) relative
    embeddings through the key and query projections."""
    w = learned(p)
    rel = w["rel_embeddings"]  # (2 att_span, H*D)
    if p.norm_rel_ebd:
        mean = rel.mean(axis=-1, keepdims=True)
        var = ((rel - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as nn.LayerNorm
        rel = (rel - mean) / np.sqrt(var + p.layer_norm_eps) * w["layer_norm_weight"] + w["layer_norm_bias"]
    key, query = ("key_proj", "query_proj") if p.share_att_key else ("pos_key_proj", "pos_query_proj")
    shape = (rel.shape[0], p.heads, p.head_dim)
    pos_key = (rel @ w[f"{key}_weight"].T + w[f"{key}_bias"]).reshape(shape)  # (2 att_span, H, D)
    pos_query = (rel @ w[f"{query}_weight"].T + w[f"{query}_bias"]).reshape(shape)  # (2 att_span, H, D)
    pos_key.setflags(write=False)
    pos_query.setflags(write=False)
    return pos_key, pos_query


# ------------------------------------------------------------------------------------------------
# float64 reference


def logits_np(p: DebertaParams, inputs) -> tuple[np.ndarray, np.ndarray]:
    """float64 (logits (B, H, Q, K), logit_abs (B, H, Q, K): the sum of |each product| / scale)."""
    qp, kp = inputs["query_positions"], inputs["key_positions"]
    check_positions(qp, p.max_positions, "query position")
    check_positions(kp, p.max_positions, "key position")
    q, k = (np.asarray(inputs[n]).astype(np.float64) for n in ("query", "key"))
    r = relative_index(p, qp[:, None] - kp[None, :])  # (Q, K)
    pos_key, pos_query = position_projections(p)

    def parts(q, k, pos_key, pos_query):
        out = [np.einsum("bhqd,bhkd->bhqk", q, k)]
        if "c2p" in terms(p):  # q_i . pos_key[r_ij]
            full = np.einsum("bhqd,shd->bhqs", q, pos_key)  # (B, H, Q, 2 att_span)
            out.append(np.take_along_axis(full, np.broadcast_to(r, full.shape[:2] + r.shape), axis=-1))
        if "p2c" in terms(p):  # k_j . pos_query[r_ij]: column r_ij of row j, transposed
            full = np.einsum("bhkd,shd->bhks", k, pos_query)  # (B, H, K, 2 att_span)
            out.append(
                np.take_along_axis(full, np.broadcast_to(r.T, full.shape[:2] + r.T.shape), axis=-1).swapaxes(-1, -2)
            )
        return sum(out) / scale(p)

    return parts(q, k, pos_key, pos_query), parts(np.abs(q), np.abs(k), np.abs(pos_key), np.abs(pos_query))


def reference(spec, inputs):
    p = parse(DebertaParams, spec)
    logits, _ = logits_np(p, inputs)
    return softmax_np(logits) @ np.asarray(inputs["value"]).astype(np.float64)  # (B, H, Q, D)


def magnitude(spec, inputs):
    """Each logit sums D products q.k, D products q.pos_key and D products k.pos_query (terms 3D + 2,
    the scaling and the tables' rounding included); logit_abs sums their absolute values, / scale."""
    p = parse(DebertaParams, spec)
    logits, logit_abs = logits_np(p, inputs)
    value_abs = np.abs(np.asarray(inputs["value"]).astype(np.float64))
    return attention_magnitude(softmax_np(logits), value_abs, logit_abs, terms=3 * p.head_dim + 2)


# ------------------------------------------------------------------------------------------------
# torch (exported)


def pick(full, flat_index):
    """full (B, H, N, 2 att_span), flat_index (Q, K) of row * 2 att_span + column -> (B, H, Q, K).

    One Gather on the flattened last two axes: ONNX GatherElements would need the index expanded to
    (B, H, Q, K), and onnx's ReferenceEvaluator cannot run it (np.choose takes at most 32 or 64 choices)."""
    import torch

    B, H = full.shape[0], full.shape[1]
    return torch.index_select(full.flatten(2), 2, flat_index.reshape(-1)).reshape(B, H, *flat_index.shape)


def module(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(DebertaParams, spec)
    P, span, dtype, inv_scale = p.max_positions, att_span(p), torch_dtype(spec.dtype), 1.0 / scale(p)
    c2p, p2c = "c2p" in terms(p), "p2c" in terms(p)
    pos_key, pos_query = position_projections(p)

    class Deberta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # row_of[rel + P - 1] = r for every rel in (-P, P).
            self.register_buffer("row_of", torch.from_numpy(relative_index(p, np.arange(1 - P, P))))  # (2P - 1,)
            # (H, D, 2 att_span) each; pos_key meets q already divided by the scale, pos_query is divided here
            if c2p:
                self.register_buffer("pos_key", torch.from_numpy(pos_key.transpose(1, 2, 0).copy()).to(dtype))
            if p2c:
                self.register_buffer("pos_query", torch.from_numpy(pos_query.transpose(1, 2, 0) * inv_scale).to(dtype))

        def forward(self, query, key, value, query_positions, key_positions):  # (B, H, Q|K, D), (Q,), (K,)
            i, j = guard(query_positions, P), guard(key_positions, P)  # out of range -> P
            bad = (i[:, None] == P) | (j[None, :] == P)  # (Q, K)
            r = take(
                self.row_of, torch.where(bad, 2 * P - 1, i[:, None] - j[None, :] + (P - 1))
            )  # (Q, K); fails if bad
            query = query * inv_scale
            logits = query @ key.transpose(-1, -2)  # (B, H, Q, K)
            if c2p:  # q_i . pos_key[r_ij]: column r_ij of row i of (B, H, Q, 2 att_span)
                rows = torch.arange(query.shape[2])[:, None]  # (Q, 1)
                logits = logits + pick(query @ self.pos_key, rows * (2 * span) + r)
            if p2c:  # k_j . pos_query[r_ij]: column r_ij of row j of (B, H, K, 2 att_span)
                rows = torch.arange(key.shape[2])[None, :]  # (1, K)
                logits = logits + pick(key @ self.pos_query, rows * (2 * span) + r)
            return torch.softmax(logits, dim=-1) @ value  # (B, H, Q, D)

    return Deberta().eval()


# ------------------------------------------------------------------------------------------------
# probes: the shared attention probes, plus every distance in (-P, P) (queries 0 and P - 1 over all keys)


def probes(spec, rng, batch=2):
    from pe_export.dtypes import numpy_dtype

    p = parse(DebertaParams, spec)
    P, H, D = p.max_positions, p.heads, p.head_dim
    cases = attention_probes(spec, rng, batch, P, H, D)
    qp, kp = np.array(sorted({0, P - 1}), dtype=np.int64), np.arange(P, dtype=np.int64)
    x = {
        n: rng.standard_normal((batch, H, len(ids), D), dtype=np.float32).astype(numpy_dtype(spec.dtype))
        for n, ids in (("query", qp), ("key", kp), ("value", kp))
    }
    return cases + [("distances", x | {"query_positions": qp, "key_positions": kp})]


ENCODINGS.register("deberta")(
    Encoding(
        name="deberta",
        params=DebertaParams,
        module=module,
        reference=reference,
        magnitude=magnitude,
        **{**contract("attention", DebertaParams), "probes": probes},
        reference_impl="transformers 5.23 deberta_v2 DisentangledSelfAttention, make_log_bucket_position, "
        "get_rel_embedding",
    )
)
