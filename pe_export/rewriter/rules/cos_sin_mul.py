"""transformers 5.x's rotary forward, as torch.onnx.export(dynamo=True) writes it (Llama, Mistral, Qwen2,
GPT-NeoX, Gemma, Phi-3 without LongRoPE):

    position_ids (B, S) -> Unsqueeze(-1) -> Cast(FLOAT) -> Mul(., inv_freq (R/2,)) -> Concat(f, f, axis=-1)
    -> Cos, Sin                                             (B, S, R)

The variant with the attention factor (YaRN, LongRoPE: `cos = emb.cos() * attention_scaling`) is
`cos_sin_mul_factor`; the exporter folds the Mul away when the factor is 1.
"""

from __future__ import annotations

import onnx_ir as ir

from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import ConstantFreqRule, has_factor_mul  # noqa: F401 (has_factor_mul re-exported)


def angles(op, position_ids, axes, inv_freq):
    freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)  # (B, S, R/2)
    return op.Concat(freqs, freqs, axis=-1)  # (B, S, R)


@RULES.register("cos_sin_mul")
class CosSinMul(ConstantFreqRule):
    rule_name = "cos_sin_mul"

    def pattern(self, op, position_ids, axes, inv_freq):
        return self.trig(op, angles(op, position_ids, axes, inv_freq))


@RULES.register("cos_sin_mul_factor")
class CosSinMulFactor(ConstantFreqRule):
    rule_name = "cos_sin_mul_factor"
    order = 0  # contains cos_sin_mul's shape

    def pattern(self, op, position_ids, axes, inv_freq, factor):
        return op.Mul(self.trig(op, angles(op, position_ids, axes, inv_freq)), factor)
