"""The graph contracts encodings export to, and what they share: example inputs, probes, `locate`,
the guarded table read and single-layer softmax attention.

    absolute   position_ids int64 (B, S) -> embeddings (B, S, dim)
    bias       query_positions int64 (Q,), key_positions int64 (K,) -> bias (1, H, Q, K), added to logits
    attention  query (B, H, Q, D), key (B, H, K, D), value (B, H, K, D)
               [, query_positions int64 (Q,), key_positions int64 (K,)] -> output (B, H, Q, D)
    rotary     x, position_ids -> y (see rope.py)

Positions outside [0, P) make every runtime fail (ONNX Gather wraps negative indices, so they are
sent past the table first): no silent wrap or clamp.
"""

from __future__ import annotations

import numpy as np

from pe_export.encodings import Encoding
from pe_export.dtypes import numpy_dtype, torch_dtype

# ------------------------------------------------------------------------------------------------
# Table reads


def guard(ids, size: int):
    """Positions outside [0, size) -> size, one past the table, so the Gather that reads them fails."""
    import torch

    return torch.where((ids < 0) | (ids >= size), size, ids)


def take(table, ids):
    """table[ids] as one ONNX Gather on axis 0: (N, ...) and ids (...) -> ids.shape + table.shape[1:]."""
    import torch

    return torch.index_select(table, 0, ids.reshape(-1)).reshape(*ids.shape, *table.shape[1:])


def check_positions(ids: np.ndarray, size: int, what: str = "position") -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise IndexError(f"{what} out of range [0, {size})")


def position_cases(P: int, rng: np.random.Generator, batch: int) -> list[tuple[str, np.ndarray]]:
    """(name, position_ids (B, S)): positions spread over the table ending in its last row, the last
    block (prefill near the end), a decode step (S = 1 at a large position), and every row once (B = 1)."""
    S = min(P, 64)
    spread = np.empty((batch, S), dtype=np.int64)
    spread[0] = np.round(np.linspace(0, P - 1, S))
    for b in range(1, batch):
        spread[b] = rng.integers(0, P, S)
        spread[b, -1] = P - 1
    tail = np.broadcast_to(np.arange(P - S, P), (batch, S)).copy()
    decode = np.array([[P - 1]] + [[int(rng.integers(P - P // 4 - 1, P))] for _ in range(batch - 1)], dtype=np.int64)
    return [("spread", spread), ("tail", tail), ("decode", decode), ("all", np.arange(P, dtype=np.int64)[None, :])]


def dims(*names):
    import torch

    return {i: torch.export.Dim(n) for i, n in enumerate(names) if n}


# ------------------------------------------------------------------------------------------------
# absolute: position_ids (B, S) -> embeddings (B, S, dim)


def absolute_io(spec, P: int):
    import torch

    ids = torch.zeros((2, min(5, P)), dtype=torch.int64)
    return (ids,), {"position_ids": dims("batch", "seq")}, ["position_ids"], ["embeddings"]


def absolute_probes(spec, rng, batch, P: int):
    return [(name, {"position_ids": ids}) for name, ids in position_cases(P, rng, batch)]


def absolute_locate(spec, inputs, at) -> str:
    b, s, d = at
    return f"batch {b}, position {int(inputs['position_ids'][b, s])}, dim {d}"


# ------------------------------------------------------------------------------------------------
# bias: query_positions (Q,), key_positions (K,) -> bias (1, H, Q, K)


def bias_io(spec, P: int):
    import torch

    q, k = torch.zeros(min(3, P), dtype=torch.int64), torch.zeros(min(4, P), dtype=torch.int64)
    return (q, k), {"query_positions": dims("q"), "key_positions": dims("k")}, ["query_positions", "key_positions"], ["bias"]


def bias_cases(P: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, query positions, key positions): every distance in (-P, P) (first and last query over all
    keys), prefill at the end of the table, a decode step over a cache (Q = 1, Q != K), and scattered
    positions of unequal lengths."""
    S = min(P, 64)
    keys = np.arange(P - S, P, dtype=np.int64)
    return [
        ("distances", np.array(sorted({0, P - 1}), dtype=np.int64), np.arange(P, dtype=np.int64)),
        ("prefill", keys.copy(), keys.copy()),
        ("decode", np.array([P - 1], dtype=np.int64), keys.copy()),
        ("scattered", rng.integers(0, P, min(P, 23)), rng.integers(0, P, min(P, 37))),
    ]


def bias_probes(spec, rng, batch, P: int):
    return [(name, {"query_positions": q, "key_positions": k}) for name, q, k in bias_cases(P, rng)]


def bias_locate(spec, inputs, at) -> str:
    _, h, i, j = at
    return f"head {h}, query position {int(inputs['query_positions'][i])}, key position {int(inputs['key_positions'][j])}"


# ------------------------------------------------------------------------------------------------
# attention: query (B, H, Q, D), key and value (B, H, K, D) [, query_positions (Q,), key_positions (K,)]
#            -> output (B, H, Q, D)


def attention_io(spec, P: int, heads: int, head_dim: int, positions: bool = True):
    import torch

    q_len, k_len = min(3, P), min(4, P)
    qkv = [torch.zeros((2, heads, n, head_dim), dtype=torch_dtype(spec.dtype)) for n in (q_len, k_len, k_len)]
    names = ["query", "key", "value"]
    dynamic = {"query": dims("batch", None, "q"), "key": dims("batch", None, "k"), "value": dims("batch", None, "k")}
    args = list(qkv)
    if positions:
        args += [torch.zeros(q_len, dtype=torch.int64), torch.zeros(k_len, dtype=torch.int64)]
        names += ["query_positions", "key_positions"]
        dynamic |= {"query_positions": dims("q"), "key_positions": dims("k")}
    return tuple(args), dynamic, names, ["output"]


def attention_cases(P: int) -> list[tuple[str, int, int]]:
    """(name, Q, K): keys are positions [P - K, P) (a cache that ends at the table's end) and queries
    the last Q of them; plus a short prefill from position 0."""
    return [
        ("prefill", min(P, 48), min(P, 48)),
        ("decode", 1, min(P, 96)),
        ("cached", min(P, 8), min(P, 40)),
        ("start", min(P, 16), min(P, 16)),
    ]


def attention_probes(spec, rng, batch, P: int, heads: int, head_dim: int, positions: bool = True):
    dtype = numpy_dtype(spec.dtype)
    probes = []
    for name, Q, K in attention_cases(P):
        start = 0 if name == "start" else P - K
        keys = np.arange(start, start + K, dtype=np.int64)
        inputs = {
            n: rng.standard_normal((batch, heads, length, head_dim), dtype=np.float32).astype(dtype)
            for n, length in (("query", Q), ("key", K), ("value", K))
        }
        if positions:
            inputs |= {"query_positions": keys[K - Q :].copy(), "key_positions": keys}
        probes.append((name, inputs))
    return probes


def attention_locate(spec, inputs, at) -> str:
    b, h, i, d = at
    where = f"batch {b}, head {h}, query {i}"
    if "query_positions" in inputs:
        where += f" (position {int(inputs['query_positions'][i])})"
    return where + f", dim {d}"


def table_magnitude(reference):
    """The magnitude of a bias read from a table rounded once: |bias|, and 0 for a mask's -inf, which
    is exact."""

    def magnitude(spec, inputs):
        b = np.abs(reference(spec, inputs))
        return np.where(np.isfinite(b), b, 0.0)

    return magnitude


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64; -inf entries get weight 0."""
    m = np.max(logits, axis=-1, keepdims=True)
    e = np.exp(logits - m)
    return e / e.sum(axis=-1, keepdims=True)


def attention_magnitude(alpha: np.ndarray, value_abs: np.ndarray, logit_abs: np.ndarray, terms: int) -> np.ndarray:
    """Per output element, the magnitude its rounding error is bounded by (times eps): each logit, a sum
    of `terms` rounded products, is off by at most terms * eps * logit_abs (the sum of the absolute
    values of its products); softmax turns a logit error e into a relative weight error of at most 2e;
    the weighted sum over K values adds K + 2 roundings. So
        sum_j alpha_ij |v_jd| * (2 * terms * max_j logit_abs_ij + K + 4).
    alpha and logit_abs (B, H, Q, K); value_abs (B, H, K, D) or (B, H, Q, K, D)."""
    spread = 2 * terms * np.max(np.where(alpha > 0, logit_abs, 0.0), axis=-1, keepdims=True) + alpha.shape[-1] + 4
    if value_abs.ndim == 4:
        weighted = np.einsum("bhqk,bhkd->bhqd", alpha, value_abs)
    else:
        weighted = np.einsum("bhqk,bhqkd->bhqd", alpha, value_abs)
    return weighted * spread


# ------------------------------------------------------------------------------------------------
# An encoding's contract, sized from its parameters


def contract(kind: str, params: type, positions: bool = True) -> dict:
    """The Encoding fields a contract fixes (kind, example_inputs, probes, locate), sized from the
    encoding's parameters: `max_positions`, and `heads` and `head_dim` for an attention layer."""

    def sizes(spec):
        p = params(**spec.params)
        return (p.max_positions,) if kind != "attention" else (p.max_positions, p.heads, p.head_dim)

    io, probes, locate = {
        "absolute": (absolute_io, absolute_probes, absolute_locate),
        "bias": (bias_io, bias_probes, bias_locate),
        "attention": (attention_io, attention_probes, attention_locate),
    }[kind]
    extra = {} if kind != "attention" else {"positions": positions}
    return dict(
        kind=kind,
        example_inputs=lambda spec: io(spec, *sizes(spec), **extra),
        probes=lambda spec, rng, batch=2: probes(spec, rng, batch, *sizes(spec), **extra),
        locate=locate,
    )


def table_encoding(name: str, params: type, table, reference_impl: str) -> Encoding:
    """An absolute encoding that is one float64 (max_positions, dim) table read at the positions:
    `table(params)` builds it; the graph is a guarded Gather of it, cast once to the export dtype."""

    def module(spec):
        import torch

        p = params(**spec.params)

        class Table(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("table", torch.from_numpy(table(p)).to(torch_dtype(spec.dtype)))  # (P, dim)

            def forward(self, position_ids):  # (B, S) -> (B, S, dim)
                return take(self.table, guard(position_ids, p.max_positions))

        return Table().eval()

    def reference(spec, inputs):
        p = params(**spec.params)
        ids = inputs["position_ids"]
        check_positions(ids, p.max_positions)
        return table(p)[ids]

    return Encoding(
        name=name,
        params=params,
        module=module,
        reference=reference,
        magnitude=lambda spec, inputs: np.abs(reference(spec, inputs)),  # one rounding of each entry
        reference_impl=reference_impl,
        **contract("absolute", params),
    )
