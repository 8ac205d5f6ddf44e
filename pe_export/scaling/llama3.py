"""Llama 3.1 scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between.

Must match transformers' `_compute_llama3_parameters` (transformers 5.23), itself Meta's
`apply_scaling` (llama-models, reference_impl/model.py) with its constants as parameters.
"""

import math

from pe_export.scaling import SCALING_RULES, base_inv_freq, require


@SCALING_RULES.register("llama3")
def llama3(
    *,
    theta,
    rotary_dim,
    max_positions,
    dtype,
    seq_len=None,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_positions: int,
):
    import torch

    require("factor", factor, factor >= 1, ">= 1")
    require(
        "high_freq_factor",
        high_freq_factor,
        high_freq_factor > low_freq_factor,
        f"> low_freq_factor ({low_freq_factor})",
    )
    require("low_freq_factor", low_freq_factor, low_freq_factor > 0, "> 0")
    require("original_max_positions", original_max_positions, 0 < original_max_positions, "> 0")
    inv_freq = base_inv_freq(theta, rotary_dim, dtype)
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # wavelen < high_freq_wavelen: kept; wavelen > low_freq_wavelen: divided by factor; between: smoothed.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0
