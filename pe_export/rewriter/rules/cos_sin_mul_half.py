"""Cos/Sin of the (..., R/2) angles themselves, before any layout: M-RoPE's rotary forward in transformers
5.23 (Qwen2-VL, Qwen2.5-VL, and the families that share their `recomposition_frequencies`), as
torch.onnx.export(dynamo=True) writes a text export:

    position_ids (B, S) -> Expand(3, B, S) -> Unsqueeze(-1) -> Cast(FLOAT) -> Mul(., inv_freq (R/2,))
    -> Cos, Sin                                                                   (3, B, S, R/2)
    [-> Mul(attention factor): `cos_sin_mul_half_factor`]
    then per rotary dim the section's row (Split(mrope_section) -> Gather(i % 3) -> Concat) -> Concat(f, f)

replaced by the Gather of the float64-built (P, R/2) tables at the same positions, any rank (3, B, S):
the section selection after it is data movement, kept as the graph wrote it (`Site.width == "half"`).
"""

from __future__ import annotations

import onnx_ir as ir

from pe_export.rewriter import emit
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import ConstantFreqRule


def angles(op, position_ids, axes, inv_freq):
    return op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)  # (..., R/2)


class HalfRule(ConstantFreqRule):
    def check_positions(self, r, position_ids, axes):
        if position_ids.dtype not in (None, ir.DataType.INT64):
            return r.fail(f"positions are {position_ids.dtype}, not int64", position_ids)
        a = axes.const_value
        rank = position_ids.shape.rank() if position_ids.shape is not None else None
        if a is None or [int(v) for v in a.numpy().reshape(-1)] not in ([-1], [rank]):
            return r.fail("the positions are not unsqueezed on a new last axis", axes)
        return r

    def rewrite(self, op, position_ids, inv_freq, **_):
        p = self._p
        site = self.record(inv_freq, position_ids, self._out, p)
        site.width = "half"
        tables = self.job.tables_for(op, p)
        site.tables = [t.name for t in tables]
        rows = self.job.table_params(p).max_positions
        safe = emit.safe_positions(op, position_ids, rows)
        return op.Gather(tables[0 if self.fn == "Cos" else 1], safe)  # (..., R/2)


@RULES.register("cos_sin_mul_half")
class CosSinMulHalf(HalfRule):
    rule_name = "cos_sin_mul_half"

    def pattern(self, op, position_ids, axes, inv_freq):
        return self.trig(op, angles(op, position_ids, axes, inv_freq))


@RULES.register("cos_sin_mul_half_factor")
class CosSinMulHalfFactor(HalfRule):
    rule_name = "cos_sin_mul_half_factor"
    order = 0  # contains cos_sin_mul_half's shape

    def pattern(self, op, position_ids, axes, inv_freq, factor):
        return op.Mul(self.trig(op, angles(op, position_ids, axes, inv_freq)), factor)
