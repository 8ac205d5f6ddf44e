"""The replacement every cos/sin rule writes: a Gather of float64-built tables by the positions.

    positions (B, S) int64 -> Where(positions < 0, P, positions) -> Gather(table (P, R/2)) -> Concat(t, t)
    -> (B, S, R), the layout transformers' `torch.cat((freqs, freqs), dim=-1)` gives the rotations.

Negative positions are mapped to row P, one past the table, so every runtime that checks Gather
indices fails on them instead of wrapping (as pe-export's own files do).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def ints(op, values) -> ir.Value:
    """An int64 Constant holding a tensor (a scalar for an int, 1-D for a list), written as `value`:
    onnx2tf converts no Constant given as `value_int` / `value_ints` ("Constant node without value")."""
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def safe_positions(op, positions: ir.Value, rows: int) -> ir.Value:
    return op.Where(op.Less(positions, ints(op, 0)), ints(op, rows), positions)


def gather(op, table: ir.Value, positions: ir.Value, rows: int) -> ir.Value:
    """(B, S, R) full-width rows [t, t] of a (P, R/2) table at `positions`."""
    half = op.Gather(table, safe_positions(op, positions, rows))  # (B, S, R/2)
    return op.Concat(half, half, axis=-1)  # (B, S, R)
