"""Phi-3's LongRoPE as torch.onnx.export(dynamo=True) writes transformers 5.23's `longrope_frequency_update`:
the run-time switch on the sequence length picks the long or the short float32 `inv_freq`,

    cond = Greater(ReduceMax(position_ids) + 1, original_max_positions)
    position_ids -> Unsqueeze(-1) -> Cast(FLOAT) -> Mul(., Where(cond, long_inv_freq, short_inv_freq))
    -> Concat(f, f, axis=-1) -> Cos, Sin -> Mul(attention factor)          (B, S, R)

The replacement keeps the switch: Where(cond, Gather(long tables), Gather(short tables)), the graph's
own `cond` (checked against the config's original_max_position_embeddings).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.rewriter import emit
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import CosSinRule


@RULES.register("cos_sin_longrope")
class CosSinLongrope(CosSinRule):
    order = 0  # contains a Mul form whose inv_freq is not a constant

    def __init__(self, job):
        super().__init__(job, "cos_sin_longrope")

    def pattern(self, op, position_ids, axes, cond, long_freq, short_freq, cos_factor, sin_factor):
        inv_freq = op.Where(cond, long_freq, short_freq)
        freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)  # (B, S, R/2)
        emb = op.Concat(freqs, freqs, axis=-1)  # (B, S, R)
        return op.Mul(op.Cos(emb), cos_factor, _outputs=["cos"]), op.Mul(op.Sin(emb), sin_factor, _outputs=["sin"])

    def check(self, context, position_ids, axes, cond, long_freq, short_freq, cos_factor, sin_factor, **_):
        r = self.check_positions(pattern.MatchResult(), position_ids, axes)
        if not r:
            return r
        short = self.constant_freqs(r, short_freq)
        long = self.constant_freqs(r, long_freq) if short is not None else None
        factor = self.factor_of(r, cos_factor, sin_factor) if long is not None else None
        if factor is None:
            return r
        p = self.match_params(r, short_freq, short)
        if p is None:
            return r
        if p.scaling != "longrope":
            reason = f"scaling: the graph switches between two inv_freq at run time (LongRoPE), the config gives rope_type {p.scaling!r}"
            self.job.refuse(reason)
            return r.fail(reason)
        original = p.scaling_params["original_max_positions"]
        threshold = switch_threshold(cond)
        if threshold is not None and threshold != original:
            reason = f"original_max_position_embeddings: the graph switches to the long factors above {threshold}, the config gives {original}"
            self.job.refuse(reason)
            return r.fail(reason)
        if self.match_params(r, long_freq, long, seq_len=original + 1) is None:
            return r
        self._p = p
        return self.check_factor(r, short_freq, p, factor)

    def rewrite(self, op, position_ids, cond, short_freq, long_freq, cos, sin, **_):
        p, original = self._p, self._p.scaling_params["original_max_positions"]
        self.record(short_freq, position_ids, cos, sin, p, seq_len=original)
        cos_s, sin_s = emit.cos_sin(op, self.job, p, position_ids, seq_len=original, label="_short")
        self.record(long_freq, position_ids, cos, sin, p, seq_len=original + 1)
        cos_l, sin_l = emit.cos_sin(op, self.job, p, position_ids, seq_len=original + 1, label="_long")
        return op.Where(cond, cos_l, cos_s), op.Where(cond, sin_l, sin_s)


def switch_threshold(cond: ir.Value) -> int | None:
    """c of cond = Greater(x, c), when c is a constant."""
    node = cond.producer()
    if node is None or node.op_type != "Greater" or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    return int(np.asarray(node.inputs[1].const_value.numpy()).reshape(-1)[0])
