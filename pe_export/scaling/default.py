"""The unscaled rule: `inv_freq[m] = theta ** (-2m / R)`, attention factor 1.

Must match transformers' `compute_default_rope_parameters` (transformers 5.23, e.g.
`LlamaRotaryEmbedding`).
"""

from pe_export.scaling import SCALING_RULES, base_inv_freq


@SCALING_RULES.register("default")
def default(*, theta, rotary_dim, max_positions, dtype, seq_len=None):
    return base_inv_freq(theta, rotary_dim, dtype), 1.0
