"""YaRN (Peng et al. 2023, arXiv 2309.00071): NTK-by-parts interpolation plus an attention factor.

Must match transformers' `_compute_yarn_parameters` (transformers 5.23): correction range from
`original_max_positions`, `truncate` (floor/ceil of the range, default true), and the attention factor
`0.1 ln(factor) + 1`, or `get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)` when both
are given (DeepSeek), unless `attention_factor` is given. The factor multiplies cos and sin.

DeepSeek models additionally multiply their softmax scale by `get_mscale(factor, mscale_all_dim) ** 2`
inside attention; that is not part of cos/sin and is reported as `softmax_scale_factor`.
"""

import math

from pe_export.scaling import SCALING_RULES, require


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale_factor(*, factor, mscale_all_dim=None, **_) -> float:
    """The extra softmax-scale multiplier of DeepSeek-style YaRN (1 when `mscale_all_dim` is unset)."""
    return get_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0


@SCALING_RULES.register("yarn")
def yarn(
    *,
    theta,
    rotary_dim,
    max_positions,
    dtype,
    seq_len=None,
    factor: float,
    original_max_positions: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    truncate: bool = True,
):
    import torch

    require("factor", factor, factor >= 1, ">= 1")
    require("beta_fast", beta_fast, beta_fast > beta_slow, f"> beta_slow ({beta_slow})")
    require("beta_slow", beta_slow, beta_slow > 0, "> 0")
    require("original_max_positions", original_max_positions, original_max_positions > 0, "> 0")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    require("attention_factor", attention_factor, attention_factor > 0, "> 0")

    def correction_dim(rotations):
        return (rotary_dim * math.log(original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp

    pos_freqs = theta ** (torch.arange(0, rotary_dim, 2).to(dtype=dtype) / rotary_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=dtype) - low) / (high - low), 0, 1)
    extra = 1 - ramp
    return interpolation * (1 - extra) + extrapolation * extra, attention_factor


yarn.softmax_scale_factor = softmax_scale_factor
