"""Linear scaling, position interpolation (Chen et al. 2023, arXiv 2306.15595; kaiokendev):
`inv_freq / factor`, the same as dividing positions by `factor`.

Must match transformers' `_compute_linear_scaling_rope_parameters` (transformers 5.23).
"""

from pe_export.scaling import SCALING_RULES, base_inv_freq, require


@SCALING_RULES.register("linear")
def linear(*, theta, rotary_dim, max_positions, dtype, seq_len=None, factor: float):
    require("factor", factor, factor >= 1, ">= 1")
    return base_inv_freq(theta, rotary_dim, dtype) / factor, 1.0
