"""Dynamic NTK scaling (bloc97, emozilla): the base grows with the largest position of the call,
`theta' = theta * (factor * s / L - (factor - 1)) ** (R / (R - 2))` with `s = max(seq_len, L)` and
`L = original_max_positions`, attention factor 1.

Must match transformers' `_compute_dynamic_ntk_parameters` (transformers 5.23), called with
`seq_len = max(position_ids) + 1` as its `dynamic_frequency_update` does for a fresh module or a
growing sequence. (transformers keeps the largest base it has seen until a call falls below `L`; a
graph has no such state, so calls that shrink between `L` and an earlier maximum differ.)

`mode="runtime"` (default) computes cos/sin in the graph from the positions it is given, in float64
(or in float32 with `angles="float32"`, as transformers does). `mode="fixed"` is vLLM's behaviour: one
static table, built for `s = max_positions` (the exported `--seq`).
"""

from pe_export.scaling import SCALING_RULES, require

MODES = ("runtime", "fixed")


def switch(*, original_max_positions, mode="runtime", **_):
    """Calls whose seq_len is at most this use the unscaled base; the rest scale (runtime mode only)."""
    return original_max_positions if mode == "runtime" else None


def in_graph(*, mode="runtime", **_) -> bool:
    """The frequencies are a continuous function of the positions: computed in the graph, no table."""
    return mode == "runtime"


@SCALING_RULES.register("dynamic")
def dynamic(
    *,
    theta,
    rotary_dim,
    max_positions,
    dtype,
    seq_len=None,
    factor: float,
    original_max_positions: int,
    mode: str = "runtime",
):
    """`seq_len` may be an int or, inside an exported graph, a 0-d int64 tensor: the same code serves both."""
    import torch

    require("mode", repr(mode), mode in MODES, f"one of {', '.join(MODES)}")
    require("factor", factor, factor >= 1, ">= 1")
    require("original_max_positions", original_max_positions, original_max_positions > 0, "> 0")
    require("rotary_dim", rotary_dim, rotary_dim > 2, "> 2 for dynamic scaling")
    if mode == "fixed" or seq_len is None:
        seq_len = max_positions if mode == "fixed" else original_max_positions
    s = torch.clamp(torch.as_tensor(seq_len), min=original_max_positions).to(dtype)
    base = theta * ((factor * s / original_max_positions) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=dtype) / rotary_dim)), 1.0


dynamic.switch = switch
dynamic.in_graph = in_graph
