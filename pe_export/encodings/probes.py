"""The verification probes encodings share: positions spread over the table, its last rows, a decode
step, batch > 1, and the re-cutting of probes to a budget."""

from __future__ import annotations

import numpy as np

from pe_export.dtypes import numpy_dtype, torch_dtype


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


# bias: query_positions (Q,), key_positions (K,) -> bias (1, H, Q, K)


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


# One object per graph contract: what every encoding of that kind shares, so that nothing else in
# pe-export branches on the kind. Each owns its example inputs, probes and locating (rotary's inputs
# and probes are RoPE's own, in rope.py), the form of its static shapes and how a probe is re-cut to
# them, a probe at positions the user names, and the table position of each output element.


def windows(row: np.ndarray, S: int) -> list[np.ndarray]:
    """A 1D run of positions cut into windows of exactly S, the last one ending where the row ends
    (so the last table row stays in); a shorter row is repeated to length S."""
    if len(row) <= S:
        return [np.resize(row, S)]
    starts = list(range(len(row) - S, -1, -S))
    if starts[-1] != 0:
        starts.append(0)
    return [row[s : s + S] for s in reversed(starts)]


def resample(values: np.ndarray, shape) -> np.ndarray:
    """The probe's own random values, repeated or cut to `shape` (deterministic in the seed)."""
    return np.resize(values, shape).astype(values.dtype)


# Probes of a static graph read at most this many elements of x per probe family: with many heads,
# reading every table row would otherwise cost P * H * D (gigabytes at 128k positions).
PROBE_BUDGET = 2**24


def thin(groups: list, cost: int) -> list:
    """Evenly spaced groups within PROBE_BUDGET, always keeping the last (it holds the last row)."""
    keep = max(1, PROBE_BUDGET // max(cost, 1))
    if len(groups) <= keep:
        return groups
    picked = np.unique(np.round(np.linspace(0, len(groups) - 1, keep)).astype(int))
    return [groups[i] for i in picked]
