"""transformers 4.x's rotary forward (optimum, older torch.onnx exports; the shape onnxscript's
`CosSinCacheFusion` matches):

    inv_freq (1, R/2, 1) [-> Expand(B, R/2, 1)]; position_ids (B, S) -> Unsqueeze(1) -> Cast(FLOAT)  (B, 1, S)
    MatMul(inv_freq, positions) (B, R/2, S) -> Transpose(0, 2, 1) -> Concat(f, f, axis=-1) -> Cos, Sin
    [-> Mul(attention factor): `cos_sin_matmul_factor`]                                    (B, S, R)

optimum-onnx 0.1.0 (transformers 4.57) writes two Cast(FLOAT) on each MatMul input
(`Expand -> Cast -> Cast`, `Unsqueeze(1) -> Cast -> Cast`: the `_cast2` rules); Gemma's export computes the
positions in the graph, Range(past, past + S) (S,) -> Unsqueeze(0) -> Unsqueeze(1), which onnxslim folds into
one Unsqueeze(axes [0, 1]): accepted on a (S,) positions value, read back as (1, S).
"""

from __future__ import annotations

import onnx_ir as ir

from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import ConstantFreqRule


def angles(op, position_ids, axes, inv_freq, casts=1):
    positions = op.Unsqueeze(position_ids, axes)  # (B, 1, S)
    for _ in range(casts):
        positions = op.Cast(positions, to=ir.DataType.FLOAT)
    if casts > 1:
        inv_freq = op.Cast(op.Cast(inv_freq, to=ir.DataType.FLOAT), to=ir.DataType.FLOAT)
    freqs = op.Transpose(op.MatMul(inv_freq, positions), perm=[0, 2, 1])  # (B, S, R/2); inv_freq (B or 1, R/2, 1)
    return op.Concat(freqs, freqs, axis=-1)  # (B, S, R)


def through_expand(value: ir.Value) -> ir.Value:
    """The constant behind `Expand(inv_freq, (B, R/2, 1))` (and float Casts of it), or `value` itself."""
    node = value.producer()
    while node is not None and node.op_type in ("Expand", "Cast") and node.inputs[0] is not None:
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) != ir.DataType.FLOAT:
            break
        value = node.inputs[0]
        node = value.producer()
    return value


class MatMulRule(ConstantFreqRule):
    freqs_input = staticmethod(through_expand)

    def check_positions(self, r, position_ids, axes):
        if position_ids.dtype not in (None, ir.DataType.INT64):
            return r.fail(f"positions are {position_ids.dtype}, not int64", position_ids)
        a = axes.const_value
        got = None if a is None else [int(v) for v in a.numpy().reshape(-1)]
        rank = position_ids.shape.rank() if position_ids.shape is not None else None
        if got == [0, 1] and rank in (None, 1):
            self._lift = True  # (S,) positions computed in the graph: read back as (1, S)
            return r
        if got != [1]:
            return r.fail("the positions are not unsqueezed on axis 1 (or on axes [0, 1] of (S,) positions)", axes)
        self._lift = False
        return r

    def read_positions(self, op, position_ids):
        if getattr(self, "_lift", False):
            return op.Unsqueeze(position_ids, op.Constant(value_ints=[0]))  # (1, S)
        return position_ids


@RULES.register("cos_sin_matmul")
class CosSinMatMul(MatMulRule):
    rule_name = "cos_sin_matmul"

    def pattern(self, op, position_ids, axes, inv_freq):
        return self.trig(op, angles(op, position_ids, axes, inv_freq))


@RULES.register("cos_sin_matmul_factor")
class CosSinMatMulFactor(MatMulRule):
    rule_name = "cos_sin_matmul_factor"
    order = 0  # contains cos_sin_matmul's shape

    def pattern(self, op, position_ids, axes, inv_freq, factor):
        return op.Mul(self.trig(op, angles(op, position_ids, axes, inv_freq)), factor)


@RULES.register("cos_sin_matmul_cast2")
class CosSinMatMulCast2(MatMulRule):
    rule_name = "cos_sin_matmul_cast2"
    order = 0

    def pattern(self, op, position_ids, axes, inv_freq):
        return self.trig(op, angles(op, position_ids, axes, inv_freq, casts=2))


@RULES.register("cos_sin_matmul_cast2_factor")
class CosSinMatMulCast2Factor(MatMulRule):
    rule_name = "cos_sin_matmul_cast2_factor"
    order = 0

    def pattern(self, op, position_ids, axes, inv_freq, factor):
        return op.Mul(self.trig(op, angles(op, position_ids, axes, inv_freq, casts=2)), factor)
