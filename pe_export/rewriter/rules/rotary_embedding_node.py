"""A fused RotaryEmbedding node of either domain, reading float32 (P, R/2) caches (`fused_cache`):

    com.microsoft::RotaryEmbedding(x, position_ids, cos_cache, sin_cache)   (onnxscript's `optimize_for_ort`
        of transformers 4.x's MatMul form, ORT's transformers optimizer, onnxruntime-genai)
    RotaryEmbedding-23(x, cos_cache, sin_cache, position_ids)                (the standard op, 2D caches)

The caches are checked against the config, then the node is rebuilt, attributes kept, on float64-built
tables of --seq rows. With --op onnx|ort|decomposed the second pass (`fused_rotary`) turns it into that
target's lowering; a node already of the target counts as rotated here.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.fused_cache import FusedCacheRule
from pe_export.rewriter.rules.fused_rotary import CONTRIB, attr, conversion_refusal, is_target, node_pattern, rebuild


@RULES.register("rotary_embedding_node")
class RotaryEmbeddingNode(FusedCacheRule):
    rule_name = "rotary_embedding_node"
    functions = (CONTRIB, "ai.onnx")

    def __init__(self, job, fn):
        super().__init__(job, fn)
        self.domain = CONTRIB if fn == CONTRIB else ""
        self.fused = f"{fn}::RotaryEmbedding"
        self._node = None

    def pattern(self, op, x, position_ids, cos_cache, sin_cache):
        return node_pattern(op, self.domain, x, position_ids, cos_cache, sin_cache)

    def check(self, context, x, position_ids, cos_cache, sin_cache, **_):
        r = pattern.MatchResult()
        node = context.root
        if position_ids is None or cos_cache is None or sin_cache is None:
            return r.fail("no position_ids: the caches are per token (B, S, R/2), not tables", node)
        if position_ids.dtype not in (None, ir.DataType.INT64):
            return r.fail(f"positions are {position_ids.dtype}, not int64", position_ids)
        r = self.check_caches(
            r, cos_cache, sin_cache, attr(node, "interleaved"), attr(node, "rotary_embedding_dim"), position_ids
        )
        if not r:
            return r
        reason = conversion_refusal(node, x, position_ids, self.job.op)
        if reason:
            self.job.refuse(f"{reason} (site {cos_cache.name!r})")
            return r.fail(reason, node)
        self._node = node
        return r

    def rewrite(self, op, x, position_ids, cos_cache, sin_cache, **_):
        cos_t, sin_t, site = self.new_caches(op, cos_cache, sin_cache, position_ids.name)
        if is_target(self.domain, self.job.op):
            site.rotations += 1
        return rebuild(op, self._node, self.domain, x, position_ids, cos_t, sin_t)
