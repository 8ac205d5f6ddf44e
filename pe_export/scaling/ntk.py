"""Static NTK-aware scaling (bloc97), as transformers' early `ntk` rope type:
`theta' = theta * factor ** (R / (R - 2))`, attention factor 1.

transformers removed this rule; the formula is the one of its early `modeling_rope_utils` (see
`shared/reference/encodings.md` section 5). vLLM's `ntk` (`theta * factor`, then `inv_freq /
factor ** (2 / R)`) is a different formula: the two agree only at the lowest frequency.
"""

from pe_export.scaling import SCALING_RULES, base_inv_freq, require


@SCALING_RULES.register("ntk")
def ntk(*, theta, rotary_dim, max_positions, dtype, seq_len=None, factor: float):
    require("factor", factor, factor >= 1, ">= 1")
    require("rotary_dim", rotary_dim, rotary_dim > 2, "> 2 for ntk scaling")
    return base_inv_freq(theta * factor ** (rotary_dim / (rotary_dim - 2)), rotary_dim, dtype), 1.0
