"""transformers 5.x's rotary forward, as torch.onnx.export(dynamo=True) writes it (Llama, Mistral, Qwen2,
GPT-NeoX, Gemma, Phi-3 without LongRoPE):

    position_ids (B, S) -> Unsqueeze(-1) -> Cast(FLOAT) -> Mul(., inv_freq (R/2,)) -> Concat(f, f, axis=-1)
    -> Cos, Sin                                             (B, S, R)

The variant with the attention factor (YaRN, LongRoPE: `cos = emb.cos() * attention_scaling`) is
`cos_sin_mul_factor`; the exporter folds the Mul away when the factor is 1.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.rewriter import emit
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import CosSinRule


def angles(op, position_ids, axes, inv_freq):
    freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)  # (B, S, R/2)
    return op.Concat(freqs, freqs, axis=-1)  # (B, S, R)


def has_factor_mul(value: ir.Value) -> bool:
    """True when a consumer of cos multiplies it by a scalar constant (the factor rule's shape)."""
    for node in value.uses():
        user = node.node if hasattr(node, "node") else node[0]
        if user.op_type == "Mul":
            other = [v for v in user.inputs if v is not value]
            if other and other[0] is not None and other[0].const_value is not None and other[0].const_value.numpy().size == 1:
                return True
    return False


@RULES.register("cos_sin_mul")
class CosSinMul(CosSinRule):
    def __init__(self, job):
        super().__init__(job, "cos_sin_mul")

    def pattern(self, op, position_ids, axes, inv_freq):
        emb = angles(op, position_ids, axes, inv_freq)
        return op.Cos(emb, _outputs=["cos"]), op.Sin(emb, _outputs=["sin"])

    def check(self, context, position_ids, axes, inv_freq, cos, **_):
        r = self.check_positions(pattern.MatchResult(), position_ids, axes)
        if not r:
            return r
        if has_factor_mul(cos):
            return r.fail("cos is multiplied by an attention factor (rule cos_sin_mul_factor)", cos)
        g = self.constant_freqs(r, inv_freq)
        if g is None:
            return r
        self._p = self.match_params(r, inv_freq, g)
        if self._p is None:
            return r
        return self.check_factor(r, inv_freq, self._p, 1.0)

    def rewrite(self, op, position_ids, inv_freq, cos, sin, **_):
        self.record(inv_freq, position_ids, cos, sin, self._p)
        return emit.cos_sin(op, self.job, self._p, position_ids)


@RULES.register("cos_sin_mul_factor")
class CosSinMulFactor(CosSinRule):
    order = 0  # contains cos_sin_mul's shape
    def __init__(self, job):
        super().__init__(job, "cos_sin_mul_factor")

    def pattern(self, op, position_ids, axes, inv_freq, cos_factor, sin_factor):
        emb = angles(op, position_ids, axes, inv_freq)
        return op.Mul(op.Cos(emb), cos_factor, _outputs=["cos"]), op.Mul(op.Sin(emb), sin_factor, _outputs=["sin"])

    def check(self, context, position_ids, axes, inv_freq, cos_factor, sin_factor, **_):
        r = self.check_positions(pattern.MatchResult(), position_ids, axes)
        if not r:
            return r
        g = self.constant_freqs(r, inv_freq)
        factor = self.factor_of(r, cos_factor, sin_factor) if g is not None else None
        if factor is None:
            return r
        self._p = self.match_params(r, inv_freq, g)
        if self._p is None:
            return r
        return self.check_factor(r, inv_freq, self._p, factor)

    def rewrite(self, op, position_ids, inv_freq, cos, sin, **_):
        self.record(inv_freq, position_ids, cos, sin, self._p)
        return emit.cos_sin(op, self.job, self._p, position_ids)
