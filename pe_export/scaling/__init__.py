"""RoPE scaling rules, one file each, registered under transformers' `rope_type` names.

A rule is a function

    rule(*, theta, rotary_dim, max_positions, dtype, seq_len=None, **params) -> (inv_freq, attention_factor)

returning a torch tensor of shape (R/2,) in `dtype` and the factor that multiplies both cos and sin.
`seq_len` is `max(position_ids) + 1`, as transformers passes it; only rules whose frequencies switch
at run time read it, and they say where through a `switch(**params)` attribute (see `longrope.py`).
Rules are written with transformers' own operations in transformers' order, so that `dtype=float64`
gives the exact values (the default) and `dtype=float32` reproduces transformers' float32 arithmetic bit
for bit (the `--angles float32` mode). They raise `ValueError` naming the parameter and both values.
"""

from pe_export.registry import Registry

SCALING_RULES = Registry("scaling rule", __name__)
FIXED_ARGS = ("theta", "rotary_dim", "max_positions", "dtype", "seq_len")  # what every rule takes besides its params


def rule_params(name: str) -> dict:
    """The rule's own parameters (name -> inspect.Parameter), without the arguments every rule takes."""
    import inspect

    rule = SCALING_RULES.get(name)  # unknown names raise, listing the known ones
    return {k: v for k, v in inspect.signature(rule).parameters.items() if k not in FIXED_ARGS}


def base_inv_freq(theta: float, rotary_dim: int, dtype):
    """`1 / theta ** (arange(0, R, 2) / R)`, as transformers' `compute_default_rope_parameters`."""
    import torch

    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=dtype) / rotary_dim))


def require(name: str, value, ok: bool, want: str):
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value}")
