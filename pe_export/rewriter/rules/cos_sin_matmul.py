"""transformers 4.x's rotary forward (optimum, older torch.onnx exports; the shape onnxscript's
`CosSinCacheFusion` matches):

    inv_freq (1, R/2, 1) [-> Expand(B, R/2, 1)]; position_ids (B, S) -> Unsqueeze(1) -> Cast(FLOAT)  (B, 1, S)
    MatMul(inv_freq, positions) (B, R/2, S) -> Transpose(0, 2, 1) -> Concat(f, f, axis=-1) -> Cos, Sin
    [-> Mul(attention factor): `cos_sin_matmul_factor`]                                    (B, S, R)
"""

from __future__ import annotations

import onnx_ir as ir

from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import ConstantFreqRule


def angles(op, position_ids, axes, inv_freq):
    positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)  # (B, 1, S)
    freqs = op.Transpose(op.MatMul(inv_freq, positions), perm=[0, 2, 1])  # (B, S, R/2); inv_freq (B or 1, R/2, 1)
    return op.Concat(freqs, freqs, axis=-1)  # (B, S, R)


def through_expand(value: ir.Value) -> ir.Value:
    """The constant behind `Expand(inv_freq, (B, R/2, 1))`, or `value` itself."""
    node = value.producer()
    return node.inputs[0] if node is not None and node.op_type == "Expand" else value


class MatMulRule(ConstantFreqRule):
    freqs_input = staticmethod(through_expand)

    def check_positions(self, r, position_ids, axes):
        if position_ids.dtype not in (None, ir.DataType.INT64):
            return r.fail(f"positions are {position_ids.dtype}, not int64", position_ids)
        a = axes.const_value
        if a is None or [int(v) for v in a.numpy().reshape(-1)] != [1]:
            return r.fail("the positions are not unsqueezed on axis 1", axes)
        return r


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
