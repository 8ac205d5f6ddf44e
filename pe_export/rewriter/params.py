"""The RoPE parameters a model's config gives, and their agreement with what a graph holds.

A graph holds a float32 `inv_freq` (R/2,) (transformers' forward multiplies it by the positions) or a
float32 table; the config gives float64 parameters. They agree when the graph's values equal the
float32 rounding of the config's float64 values to within `ULPS` float32 units in the last place:
transformers computes `inv_freq` with a chain of float32 torch ops (pow, divisions, llama3's smoothing),
which lands a few units away from the correctly rounded value (3 units measured for llama3 at head dim 128).
A wrong parameter moves the frequencies by far more (theta 10000 vs 10001: 1e-4 relative at the last
frequency). A disagreement is reported by the parameter that explains it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from pe_export.encodings.rope import RopeParams, inv_freq
from pe_export.errors import BadInput

ULPS = 16  # float32 units in the last place allowed between the graph and the config's rounded value
REL = ULPS * 2.0**-23  # one ulp is at most 2^-23 relative


def params_from_config(config: Path | str | dict, seq: int | None = None) -> list[RopeParams]:
    """Every RoPE parameter set `config` describes: one, or one per layer type where `rope_parameters`
    is keyed by layer type (Gemma 3: `sliding_attention`, `full_attention`)."""
    from pe_export.hf_config import SECTION_KEYS, rope_params_by_layer_type

    # M-RoPE's sections are the graph's own selection after Cos (rules.cos_sin_mul_half): not table parameters.
    found = rope_params_by_layer_type(Path(config), seq, graph_keys=SECTION_KEYS)  # raises BadInput itself
    out = []
    for name, params in found.items():
        try:
            out.append(RopeParams(**params))
        except ValueError as e:
            raise BadInput(f"config{f' ({name})' if name else ''}: {e}") from None
    return out


def float32_inv_freq(p: RopeParams, seq_len: int | None = None) -> np.ndarray:
    """The float32 rounding of the config's float64 `inv_freq` (R/2,)."""
    return inv_freq(p, seq_len)[0].astype(np.float32)


def attention_factor(p: RopeParams, seq_len: int | None = None) -> float:
    return inv_freq(p, seq_len)[1]


def agrees(graph: np.ndarray, expected: np.ndarray) -> bool:
    graph = np.asarray(graph, dtype=np.float64).reshape(-1)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    if graph.shape != expected.shape:
        return False
    return bool(np.all(np.abs(graph - expected) <= REL * np.abs(expected) + 1e-45))


def disagreement(graph_inv_freq: np.ndarray, p: RopeParams, seq_len: int | None = None) -> str | None:
    """None when the graph's float32 `inv_freq` is the config's, else the parameter that disagrees,
    with both values."""
    g = np.asarray(graph_inv_freq, dtype=np.float64).reshape(-1)
    if 2 * g.size != p.rotary_dim:
        return (
            f"rotary dim: the graph's inv_freq has {g.size} frequencies (rotary dim {2 * g.size}), the config "
            f"gives rotary dim {p.rotary_dim}"
        )
    want = float32_inv_freq(p, seq_len)
    if agrees(g, want):
        return None
    # The first frequencies are theta^(-2i/R) under every supported rule except linear (and LongRoPE's
    # short factors), so theta read off the graph's second frequency names a wrong theta.
    if g.size > 1 and g[1] > 0:
        theta_graph = g[1] ** (-p.rotary_dim / 2)
        # theta^(-2/R) holds a float32 rounding: theta read back is good to about (R/2) ulps relative.
        if abs(theta_graph - p.theta) > 4 * (p.rotary_dim / 2) * 2.0**-23 * p.theta and abs(g[0] - 1.0) < 1e-6:
            return f"theta: the graph's inv_freq gives theta {theta_graph:.6g}, the config gives {p.theta:g}"
    i = int(np.argmax(np.abs(g - want) / np.abs(want)))
    scaling = f"rope_type {p.scaling!r}" + (f" {p.scaling_params}" if p.scaling_params else "")
    return (
        f"scaling: the graph's inv_freq[{i}] is {g[i]:.9g}, the config ({scaling}, theta {p.theta:g}) gives "
        f"{want[i]:.9g}"
    )


def match(
    graph_inv_freq: np.ndarray, candidates: list[RopeParams], seq_len: int | None = None
) -> tuple[RopeParams | None, str]:
    """The candidate whose float32 inv_freq the graph holds, or None and the reason naming the parameter."""
    reasons = []
    for p in candidates:
        reason = disagreement(graph_inv_freq, p, seq_len)
        if reason is None:
            return p, ""
        reasons.append(reason)
    return None, reasons[0] if len(reasons) == 1 else "; ".join(dict.fromkeys(reasons))


def factor_disagreement(graph_factor: float, p: RopeParams, seq_len: int | None = None, rounding: float = 0.0):
    """None when the graph's attention factor is the config's (to REL, plus `rounding`: relative, of a
    table in a narrower dtype than float32), else the disagreement."""
    want = attention_factor(p, seq_len)
    if math.isclose(graph_factor, float(np.float32(want)), rel_tol=REL + rounding):
        return None
    return f"attention factor: the graph multiplies cos/sin by {graph_factor:.9g}, the config gives {want:.9g}"


def with_seq(p: RopeParams, seq: int | None) -> RopeParams:
    return p if seq is None or seq == p.max_positions else replace(p, max_positions=seq)
