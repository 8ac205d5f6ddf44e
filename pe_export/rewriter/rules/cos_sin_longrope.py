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

from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import CosSinRule


@RULES.register("cos_sin_longrope")
class CosSinLongrope(CosSinRule):
    rule_name = "cos_sin_longrope"
    order = 0  # contains a Mul form whose inv_freq is not a constant

    def pattern(self, op, position_ids, axes, cond, long_freq, short_freq, factor):
        inv_freq = op.Where(cond, long_freq, short_freq)
        freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)  # (B, S, R/2)
        emb = op.Concat(freqs, freqs, axis=-1)  # (B, S, R)
        return op.Mul(self.trig(op, emb), factor)

    def check(self, context, position_ids, axes, cond, long_freq, short_freq, factor, **_):
        self._out = context.output_values[0]
        r = self.check_positions(pattern.MatchResult(), position_ids, axes)
        if not r:
            return r
        short = self.constant_freqs(r, short_freq)
        long = self.constant_freqs(r, long_freq) if short is not None else None
        value = self.factor_of(r, factor) if long is not None else None
        if value is None:
            return r
        p = self.match_params(r, short_freq, short)
        if p is None:
            return r
        if p.scaling != "longrope":
            reason = (
                f"scaling: the graph switches between two inv_freq at run time (LongRoPE), the config gives "
                f"rope_type {p.scaling!r}"
            )
            self.job.refuse(reason)
            return r.fail(reason)
        original = p.scaling_params["original_max_positions"]
        threshold = switch_threshold(cond)
        if threshold is not None and threshold != original:
            reason = (
                f"original_max_position_embeddings: the graph switches to the long factors above {threshold}, "
                f"the config gives {original}"
            )
            self.job.refuse(reason)
            return r.fail(reason)
        if self.match_params(r, long_freq, long, seq_len=original + 1) is None:
            return r
        self._p = p
        return self.check_factor(r, short_freq, p, value)

    def rewrite(self, op, position_ids, cond, short_freq, long_freq, **_):
        p, original = self._p, self._p.scaling_params["original_max_positions"]
        short = self.gather(
            op, p, position_ids, self.record(short_freq, position_ids, self._out, p, original), original, "_short"
        )
        long = self.gather(
            op, p, position_ids, self.record(long_freq, position_ids, self._out, p, original + 1), original + 1, "_long"
        )
        return op.Where(cond, long, short)


def switch_threshold(cond: ir.Value) -> int | None:
    """c of cond = Greater(x, c), when c is a constant."""
    node = cond.producer()
    if node is None or node.op_type != "Greater" or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    return int(np.asarray(node.inputs[1].const_value.numpy()).reshape(-1)[0])
