"""Shaw relative position representations (Shaw, Uszkoreit, Vaswani 2018, arXiv 1803.02155).

Must match tensor2tensor's `dot_product_attention_relative` with `_generate_relative_positions_matrix`,
`_generate_relative_positions_embeddings` and `_relative_attention_inner`
(tensorflow/tensor2tensor@5623deb tensor2tensor/layers/common_attention.py, the t2t 1.x form: one key
table and one value table, each (2k + 1, D), shared by all heads). For query position i and key position j:

    r_ij    = clip(j - i, -k, k) + k                           k = max_relative_position
    logit   = q_i . (k_j + a^K[r_ij]) / sqrt(D)                t2t's multihead_attention scales q by D^-0.5 first
    alpha   = softmax_j(logit)                                 causal: keys after the query (j > i) masked with -inf
    out_i   = sum_j alpha_ij (v_j + a^V[r_ij])

t2t takes positions 0..L-1 (queries the last Q of the K keys; `cache=True` a single query at K - 1); here
they are the inputs `query_positions` and `key_positions`, so any cache layout works and only j - i matters.
The graph reads the (Q, K, D) relative tables with one guarded Gather each (positions outside
[0, max_positions) are sent past the table) and adds the two extra terms `bhqd,qkd->bhqk` (logits) and
`bhqk,qkd->bhqd` (output) as batched MatMuls, the way `_relative_attention_inner` does. a^K and a^V are
seeded N(0, 1) (t2t's `get_variable` default initializer differs; the values are weights, not the scheme).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pe_export import weights
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.bounds import attention_magnitude, softmax_np
from pe_export.encodings.contracts import contract
from pe_export.encodings.table_reads import check_positions, guard, take


@dataclass(frozen=True, kw_only=True)
class ShawParams(weights.LearnedWeights):
    heads: int
    head_dim: int
    max_relative_position: int = 16  # k: distances are clipped to [-k, k], 2k + 1 learned rows per table
    max_positions: int = 512
    causal: bool = False  # False: encoder self-attention; True: keys after their query are masked

    def __post_init__(self):
        self.check_weights(supported=False)
        for name in ("heads", "head_dim", "max_relative_position", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be true or false, got {self.causal!r}")


def tables(p: ShawParams) -> tuple[np.ndarray, np.ndarray]:
    """float64 (2k + 1, D) key table a^K and value table a^V, seeded N(0, 1)."""
    shape = (2 * p.max_relative_position + 1, p.head_dim)
    w = weights.random(p.weights_seed, {"relative_keys": shape, "relative_values": shape}, {})
    return w["relative_keys"], w["relative_values"]


def relative_index(p: ShawParams, query_positions: np.ndarray, key_positions: np.ndarray) -> np.ndarray:
    """int64 (Q, K) table row r_ij = clip(j - i, -k, k) + k."""
    k = p.max_relative_position
    return np.clip(key_positions[None, :] - query_positions[:, None], -k, k) + k


# ------------------------------------------------------------------------------------------------
# float64 reference


def logits_np(p: ShawParams, inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(logits (B, H, Q, K) with the causal mask, logit_abs (B, H, Q, K), value side v (B, H, K, D) and
    a^V[r] (Q, K, D)), all float64."""
    qp, kp = inputs["query_positions"], inputs["key_positions"]
    check_positions(qp, p.max_positions, "query position")
    check_positions(kp, p.max_positions, "key position")
    q, k, v = (np.asarray(inputs[n]).astype(np.float64) for n in ("query", "key", "value"))
    a_k, a_v = tables(p)
    r = relative_index(p, qp, kp)  # (Q, K)
    rel_k = a_k[r]  # (Q, K, D)
    scale = 1.0 / math.sqrt(p.head_dim)
    logits = (np.einsum("bhqd,bhkd->bhqk", q, k) + np.einsum("bhqd,qkd->bhqk", q, rel_k)) * scale
    q_abs = np.abs(q)
    logit_abs = (
        np.einsum("bhqd,bhkd->bhqk", q_abs, np.abs(k)) + np.einsum("bhqd,qkd->bhqk", q_abs, np.abs(rel_k))
    ) * scale
    if p.causal:
        logits = np.where(kp[None, :] > qp[:, None], -np.inf, logits)
    return logits, logit_abs, v, a_v[r]


def reference(spec, inputs):
    p = parse(ShawParams, spec)
    logits, _, v, rel_v = logits_np(p, inputs)
    alpha = softmax_np(logits)  # (B, H, Q, K)
    return np.einsum("bhqk,bhkd->bhqd", alpha, v) + np.einsum("bhqk,qkd->bhqd", alpha, rel_v)


def magnitude(spec, inputs):
    """Each logit sums D products q.k and D products q.a^K (terms 2D + 2); each output sums
    alpha_ij (v_jd + a^V[r_ij]_d), so the value side is |v_j| + |a^V[r_ij]| per (i, j, d)."""
    p = parse(ShawParams, spec)
    logits, logit_abs, v, rel_v = logits_np(p, inputs)
    value_abs = np.abs(v)[:, :, None, :, :] + np.abs(rel_v)[None, None]  # (B, H, Q, K, D)
    return attention_magnitude(softmax_np(logits), value_abs, logit_abs, terms=2 * p.head_dim + 2)


# ------------------------------------------------------------------------------------------------
# torch (exported)


def shaw_attention(query, key, value, rel_keys, rel_values, mask, scale: float):
    """query (B, H, Q, D), key and value (B, H, K, D), rel_keys and rel_values (Q, K, D) = a^K[r], a^V[r],
    mask (Q, K) bool (True: masked) or None -> (B, H, Q, D).

    The two relative terms are the einsums `bhqd,qkd->bhqk` and `bhqk,qkd->bhqd`, written as t2t's
    `_relative_attention_inner` computes them: queries to the front, one (B, H, .) x (., .) MatMul per
    query, and back. (ONNX Einsum takes no bfloat16; MatMul does.)"""
    query = query * scale  # as t2t: q is scaled before both products
    rel_logits = (query.permute(2, 0, 1, 3) @ rel_keys.transpose(-1, -2)[:, None]).permute(1, 2, 0, 3)  # (B, H, Q, K)
    logits = query @ key.transpose(-1, -2) + rel_logits  # (B, H, Q, K)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    alpha = logits.softmax(dim=-1)  # (B, H, Q, K)
    rel_out = (alpha.permute(2, 0, 1, 3) @ rel_values[:, None]).permute(1, 2, 0, 3)  # (B, H, Q, D)
    return alpha @ value + rel_out


def module(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(ShawParams, spec)
    P, k = p.max_positions, p.max_relative_position
    a_k, a_v = tables(p)

    class Shaw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("relative_keys", torch.from_numpy(a_k).to(torch_dtype(spec.dtype)))  # (2k + 1, D)
            self.register_buffer("relative_values", torch.from_numpy(a_v).to(torch_dtype(spec.dtype)))  # (2k + 1, D)

        def forward(self, query, key, value, query_positions, key_positions):
            i, j = guard(query_positions, P), guard(key_positions, P)  # out of range -> P
            bad = (i[:, None] == P) | (j[None, :] == P)  # (Q, K)
            r = torch.clamp(j[None, :] - i[:, None], -k, k) + k  # (Q, K)
            r = torch.where(bad, 2 * k + 1, r)  # one past the tables if bad: the Gathers fail
            mask = (j[None, :] > i[:, None]) if p.causal else None
            return shaw_attention(
                query,
                key,
                value,
                take(self.relative_keys, r),
                take(self.relative_values, r),
                mask,
                1.0 / math.sqrt(p.head_dim),
            )

    return Shaw().eval()


ENCODINGS.register("shaw")(
    Encoding(
        name="shaw",
        params=ShawParams,
        module=module,
        reference=reference,
        magnitude=magnitude,
        **contract("attention", ShawParams),
        reference_impl="tensor2tensor common_attention.py dot_product_attention_relative (t2t 1.x, 5623deb)",
    )
)
