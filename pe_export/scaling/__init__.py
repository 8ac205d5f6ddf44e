"""RoPE scaling rules, one file each, registered under transformers' `rope_type` names.

A rule is a function `rule(*, theta, rotary_dim, float32=False) -> (inv_freq, attention_factor)`:
`inv_freq` is a float64 array of shape (R/2,), `attention_factor` multiplies both cos and sin. With
`float32=True` the rule reproduces transformers' float32 arithmetic for `inv_freq` (the values are
float32 numbers held in float64), for the `--angles float32` mode.
"""

from pe_export.registry import Registry

SCALING_RULES = Registry("scaling rule", __name__)
