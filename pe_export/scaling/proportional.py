"""Proportional RoPE (Gemma 4): pairs (i, i + D/2) over the whole head, exponent denominator the head
dim, only the first `int(partial_rotary_factor * D // 2)` pairs rotating and the rest given frequency
0 (an identity rotation); then `inv_freq / factor`.

Must match transformers' `_compute_proportional_rope_parameters` (transformers 5.23). Unlike the other
rules, `partial_rotary_factor` here is a parameter of the rule, not `rotary_dim`: the export rotates the
whole head (`rotary_dim = head_dim`) with zero frequencies in the tail pairs, as transformers does.
"""

from pe_export.scaling import SCALING_RULES, require


@SCALING_RULES.register("proportional")
def proportional(
    *, theta, rotary_dim, max_positions, dtype, seq_len=None, partial_rotary_factor: float = 1.0, factor: float = 1.0
):
    import torch

    require("partial_rotary_factor", partial_rotary_factor, 0 < partial_rotary_factor <= 1, "in (0, 1]")
    require("factor", factor, factor >= 1, ">= 1")
    rope_angles = int(partial_rotary_factor * rotary_dim // 2)
    rotated = 1.0 / (theta ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).to(dtype=dtype) / rotary_dim))
    still = torch.zeros(rotary_dim // 2 - rope_angles, dtype=dtype)  # frequency 0: cos 1, sin 0
    return torch.cat([rotated, still]) / factor, 1.0
