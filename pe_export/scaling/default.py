"""The unscaled rule: `inv_freq[m] = theta ** (-2m / R)`, attention factor 1.

Must match transformers' `compute_default_rope_parameters` (transformers 5.23, e.g.
`LlamaRotaryEmbedding`): `1 / theta ** (arange(0, R, 2) / R)`.
"""

import numpy as np

from pe_export.scaling import SCALING_RULES


@SCALING_RULES.register("default")
def default(*, theta: float, rotary_dim: int, float32: bool = False) -> tuple[np.ndarray, float]:
    if float32:
        # transformers' own float32 arithmetic, op for op: torch's float32 pow differs from the
        # correctly rounded value in the last bit for about a third of the entries.
        import torch

        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rotary_dim
        return (1.0 / (theta**exponents)).double().numpy(), 1.0
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim  # (R/2,)
    return theta**-exponents, 1.0
