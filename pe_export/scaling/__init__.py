"""RoPE scaling rules, one file each, registered under transformers' `rope_type` names.

A rule is a function

    rule(*, theta, rotary_dim, max_positions, dtype, seq_len=None, **params) -> (inv_freq, attention_factor)

returning a torch tensor of shape (R/2,) in `dtype` and the factor that multiplies both cos and sin.
Each of a rule's own parameters is annotated with its kind (`float`, `int`, `bool`, `str`, `list` of
numbers, `| None` where it may be unset): `check_param` refuses other values before the rule runs.
`seq_len` is `max(position_ids) + 1`, as transformers passes it; only rules whose frequencies switch
at run time read it, and they say where through a `switch(**params)` attribute (see `longrope.py`).
Rules are written with transformers' own operations in transformers' order, so that `dtype=float64`
gives the exact values (the default) and `dtype=float32` reproduces transformers' float32 arithmetic bit
for bit (the `--angles float32` mode). They raise `ValueError` naming the parameter and both values.
"""

import math
import typing

from pe_export.registry import Registry

SCALING_RULES = Registry("scaling rule", __name__)
FIXED_ARGS = ("theta", "rotary_dim", "max_positions", "dtype", "seq_len")  # what every rule takes besides its params


def rule_params(name: str) -> dict:
    """The rule's own parameters (name -> inspect.Parameter), without the arguments every rule takes."""
    import inspect

    rule = SCALING_RULES.get(name)  # unknown names raise, listing the known ones
    return {k: v for k, v in inspect.signature(rule).parameters.items() if k not in FIXED_ARGS}


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# A parameter's annotation -> (the test its values pass, what the message says it must be).
PARAM_KINDS = {
    float: (_finite_number, "a finite number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    list: (lambda v: isinstance(v, (list, tuple)) and all(_finite_number(x) for x in v), "a list of finite numbers"),
}


def check_param(rule: str, name: str, value, annotation) -> None:
    """Refuse a value of the wrong kind for the rule's parameter `name` (annotated `annotation`), as
    `from-config` refuses it in a config.json: bools are not numbers, strings not numbers, inf/NaN not finite."""
    kinds = typing.get_args(annotation) or (annotation,)
    optional = type(None) in kinds
    if value is None and optional:
        return
    kind = next(k for k in kinds if k is not type(None))
    ok, want = PARAM_KINDS[kind]
    if not ok(value):
        raise ValueError(
            f"scaling rule {rule!r} parameter {name!r} must be {want}{' or null' if optional else ''}, got {value!r}"
        )


def base_inv_freq(theta: float, rotary_dim: int, dtype):
    """`1 / theta ** (arange(0, R, 2) / R)`, as transformers' `compute_default_rope_parameters`."""
    import torch

    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=dtype) / rotary_dim))


def require(name: str, value, ok: bool, want: str):
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value}")
