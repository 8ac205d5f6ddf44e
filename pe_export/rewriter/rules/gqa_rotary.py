"""ONNX Runtime's `com.microsoft::GroupQueryAttention` with `do_rotary=1`, reading float32 (P, R/2) caches
(`fused_cache`) as its inputs 7 and 8:

    GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                        cos_cache, sin_cache, ...) -> output, present_key, present_value

onnxruntime-genai's model builder writes constant caches (packed QKV: key and value empty); onnxscript's
`optimize_for_ort` (GQA fusion of transformers 4.x's MatMul form) writes the in-graph computed ones.
The positions are the node's own (past length + s, from seqlens_k), so the site has none.

The caches are checked against the config (and `rotary_interleaved` against its pairing), then the node
is rebuilt, inputs and attributes kept, on float64-built tables of --seq rows. The rotation inside GQA is
ORT's kernel and stays so under every --op: with onnx|ort|decomposed the node keeps do_rotary on the new
tables (unfusing attention is no rewrite of RoPE), and the site's `fused` says so.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.fused_cache import FusedCacheRule
from pe_export.rewriter.rules.fused_rotary import CONTRIB, attr

COS_INPUT = 7  # cos_cache, then sin_cache


@RULES.register("gqa_rotary")
class GqaRotary(FusedCacheRule):
    rule_name = "gqa_rotary"
    fused = "com.microsoft::GroupQueryAttention"

    def pattern(self, op, cos_cache, sin_cache):
        anything = [
            pattern.ANY_VALUE
        ] * COS_INPUT  # query .. total_sequence_length; key and value may be empty (packed QKV)
        return op.GroupQueryAttention(
            *anything,
            cos_cache,
            sin_cache,
            _domain=CONTRIB,
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _outputs=3,
        )

    def check(self, context, cos_cache, sin_cache, **_):
        r = pattern.MatchResult()
        node = context.root
        if not attr(node, "do_rotary") or cos_cache is None or sin_cache is None:
            return r.fail("GroupQueryAttention without do_rotary and cos/sin caches", node)
        r = self.check_caches(r, cos_cache, sin_cache, attr(node, "rotary_interleaved"))
        if r:
            self._node = node
        return r

    def rewrite(self, op, cos_cache, sin_cache, **_):
        node = self._node
        cos_t, sin_t, _site = self.new_caches(op, cos_cache, sin_cache)
        inputs = list(node.inputs)
        inputs[COS_INPUT : COS_INPUT + 2] = cos_t, sin_t
        attrs = {k: a.value for k, a in node.attributes.items()}
        return op.GroupQueryAttention(*inputs, **attrs, _domain=CONTRIB, _version=1, _outputs=3)
