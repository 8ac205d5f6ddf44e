"""The guarded table read every encoding's graph uses: positions outside [0, P) make every runtime
fail (ONNX Gather wraps negative indices, so they are sent past the table first): no silent wrap or clamp."""

from __future__ import annotations

import numpy as np

# Table reads


def guard(ids, size: int):
    """Positions outside [0, size) -> size, one past the table, so the Gather that reads them fails.
    The replacement is a tensor of ids' shape, not a scalar: onnx2tf writes a Where of rank-1 ids and a
    scalar as TFLite's SELECT, which does not broadcast, and LiteRT then cannot run it (docs/runtimes.md: LiteRT)."""
    import torch

    return torch.where((ids < 0) | (ids >= size), torch.full_like(ids, size), ids)


def take(table, ids):
    """table[ids] as one ONNX Gather on axis 0: (N, ...) and ids (...) -> ids.shape + table.shape[1:]."""
    import torch

    return torch.index_select(table, 0, ids.reshape(-1)).reshape(*ids.shape, *table.shape[1:])


def mask_later_keys(bias, later):
    """bias (..., Q, K) with -inf where `later` (Q, K) is true: a key after its query, the causal mask.

    An addition of a (Q, K) mask read from the table [0, -inf], not a Where: onnx2tf writes a Where whose
    three operands do not all have the output's shape as cond * x + (1 - cond) * y, where 0 * -inf is NaN
    (docs/runtimes.md: LiteRT). bias + 0 = bias and bias + -inf = -inf exactly for every finite bias (each encoding
    keeps its bias finite, so that -inf is the mask alone), on every runtime; a -0 comes back +0."""
    import torch

    table = torch.tensor([0.0, float("-inf")], dtype=bias.dtype)  # (2,)
    return bias + take(table, later.long())  # (..., Q, K)


def check_positions(ids: np.ndarray, size: int, what: str = "position") -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise IndexError(f"{what} out of range [0, {size})")
