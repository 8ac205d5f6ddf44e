"""LongRoPE (Ding et al. 2024, arXiv 2402.13753), Phi-3's "su"/"longrope": per-frequency rescale factors,
short ones up to the original context and long ones beyond it.

Must match transformers' `_compute_longrope_parameters` and `longrope_frequency_update` (transformers
5.23): `inv_freq = 1 / (ext * theta ** (arange(0, R, 2) / R))` with `ext = long_factor` when
`seq_len = max(position_ids) + 1 > original_max_positions`, else `short_factor`; attention factor
`sqrt(1 + ln(factor) / ln(original_max_positions))` (1 if factor <= 1) unless given.

`mode="runtime"` (default) keeps that switch in the exported graph; `mode="long"` uses the long factors
for every position, as vLLM does so that a KV cache stays consistent when a prompt grows past the
original length. transformers falls back to `max_position_embeddings / original_max_positions` for a
missing `factor`; here `factor` is required (`from-config` fills it that way), so the attention factor
never depends on the exported table length.
"""

import math

from pe_export.scaling import SCALING_RULES, require

MODES = ("runtime", "long")


def switch(*, original_max_positions, mode="runtime", **_):
    """The seq_len above which the long factors apply in the graph, or None when nothing switches."""
    return original_max_positions if mode == "runtime" else None


@SCALING_RULES.register("longrope")
def longrope(
    *,
    theta,
    rotary_dim,
    max_positions,
    dtype,
    seq_len=None,
    short_factor: list,
    long_factor: list,
    original_max_positions: int,
    factor: float,
    attention_factor: float | None = None,
    mode: str = "runtime",
):
    import torch

    require("mode", repr(mode), mode in MODES, f"one of {', '.join(MODES)}")
    for name, values in (("short_factor", short_factor), ("long_factor", long_factor)):
        if not isinstance(values, (list, tuple)) or len(values) != rotary_dim // 2:
            length = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"{name} must be a list of rotary_dim/2 = {rotary_dim // 2} numbers, got {length}")
        require(name, "values <= 0", all(v > 0 for v in values), "all > 0")
    require("factor", factor, factor >= 1, ">= 1")
    require("original_max_positions", original_max_positions, original_max_positions > 1, "> 1")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_max_positions))
    use_long = mode == "long" or (seq_len is not None and seq_len > original_max_positions)
    ext = torch.tensor(long_factor if use_long else short_factor, dtype=torch.float64).to(dtype)
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype) / rotary_dim
    return 1.0 / (ext * theta**shape), attention_factor


longrope.switch = switch
