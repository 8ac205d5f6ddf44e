"""The replacement for a dynamic-NTK site (rope_type "dynamic", mode "runtime"): cos/sin computed in the
graph, in float64, from the positions of the call, since its frequencies are a continuous function of
max(position) + 1 and no table (nor one table per length) can hold them.

Must match transformers' `_compute_dynamic_ntk_parameters` (transformers 5.23) as its
`dynamic_frequency_update` calls it for a fresh module (pe_export.scaling.dynamic):

    s = max(max(position_ids) + 1, L)                                  L = original_max_positions
    base = theta * (factor * s / L - (factor - 1)) ** (R / (R - 2))
    inv_freq = 1 / base ** (arange(0, R, 2) / R)                        (R/2,)
    cos, sin = cos(positions * inv_freq), sin(...) * attention factor   (B, S, R/2) -> [t, t] (B, S, R)

every step in float64 and only cos/sin cast to float32. An exporter that traced transformers' forward
froze the branch of its example (s = L: the unscaled inv_freq, a constant the cos/sin rules match
against the config); this puts the run-time rescaling back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pe_export.encodings.rope import RopeParams, inv_freq
from pe_export.rewriter.emit import ints


def cos_or_sin(op, fn: str, positions: ir.Value, p: RopeParams) -> ir.Value:
    """(B, S, R) float32 cos (fn "Cos") or sin ("Sin") of `p` at `positions` (B, S) int64, [t, t]."""
    sp = p.scaling_params
    R, L, factor = p.rotary_dim, float(sp["original_max_positions"]), float(sp["factor"])
    double = lambda x: op.Constant(value=ir.tensor(np.asarray(x, dtype=np.float64)))  # noqa: E731
    seq = op.Cast(op.Add(op.ReduceMax(positions, keepdims=0), ints(op, 1)), to=ir.DataType.DOUBLE)  # ()
    s = op.Max(seq, double(L))
    base = op.Mul(
        double(p.theta),
        op.Pow(op.Sub(op.Div(op.Mul(double(factor), s), double(L)), double(factor - 1.0)), double(R / (R - 2))),
    )
    freqs = op.Div(double(1.0), op.Pow(base, double(np.arange(0, R, 2, dtype=np.float64) / R)))  # (R/2,)
    angles = op.Mul(op.Unsqueeze(op.Cast(positions, to=ir.DataType.DOUBLE), ints(op, [-1])), freqs)  # (B, S, R/2)
    t = op.Cos(angles) if fn == "Cos" else op.Sin(angles)
    _, attention_factor = inv_freq(p)  # 1 for dynamic NTK, times the params' own factor
    if attention_factor != 1.0:
        t = op.Mul(t, double(attention_factor))
    t = op.Cast(t, to=ir.DataType.FLOAT)
    return op.Concat(t, t, axis=-1)  # (B, S, R)
