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

from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import CosSinRule


def angles(op, position_ids, axes, inv_freq):
    freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)  # (B, S, R/2)
    return op.Concat(freqs, freqs, axis=-1)  # (B, S, R)


def has_factor_mul(value: ir.Value) -> bool:
    """True when a consumer of `value` multiplies it by a scalar constant (the factor rule's shape)."""
    for use in value.uses():
        user = use.node
        if user.op_type == "Mul":
            other = [v for v in user.inputs if v is not value]
            if other and other[0] is not None and other[0].const_value is not None and other[0].const_value.numpy().size == 1:
                return True
    return False


@RULES.register("cos_sin_mul")
class CosSinMul(CosSinRule):
    rule_name = "cos_sin_mul"

    def pattern(self, op, position_ids, axes, inv_freq):
        return self.trig(op, angles(op, position_ids, axes, inv_freq))

    def check(self, context, position_ids, axes, inv_freq, **_):
        self._out = context.output_values[0]
        r = self.check_positions(pattern.MatchResult(), position_ids, axes)
        if not r:
            return r
        if has_factor_mul(self._out):
            return r.fail("cos/sin is multiplied by an attention factor (rule cos_sin_mul_factor)", self._out)
        g = self.constant_freqs(r, inv_freq)
        if g is None:
            return r
        self._p = self.match_params(r, inv_freq, g)
        if self._p is None:
            return r
        return self.check_factor(r, inv_freq, self._p, 1.0)

    def rewrite(self, op, position_ids, inv_freq, **_):
        site = self.record(inv_freq, position_ids, self._out, self._p)
        return self.gather(op, self._p, position_ids, site)


@RULES.register("cos_sin_mul_factor")
class CosSinMulFactor(CosSinRule):
    rule_name = "cos_sin_mul_factor"
    order = 0  # contains cos_sin_mul's shape

    def pattern(self, op, position_ids, axes, inv_freq, factor):
        return op.Mul(self.trig(op, angles(op, position_ids, axes, inv_freq)), factor)

    def check(self, context, position_ids, axes, inv_freq, factor, **_):
        self._out = context.output_values[0]
        r = self.check_positions(pattern.MatchResult(), position_ids, axes)
        if not r:
            return r
        g = self.constant_freqs(r, inv_freq)
        value = self.factor_of(r, factor) if g is not None else None
        if value is None:
            return r
        self._p = self.match_params(r, inv_freq, g)
        if self._p is None:
            return r
        return self.check_factor(r, inv_freq, self._p, value)

    def rewrite(self, op, position_ids, inv_freq, **_):
        site = self.record(inv_freq, position_ids, self._out, self._p)
        return self.gather(op, self._p, position_ids, site)
