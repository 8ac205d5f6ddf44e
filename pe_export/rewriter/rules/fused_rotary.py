"""--op onnx|ort|decomposed on a fused `RotaryEmbedding` node (either domain) whose caches were rewritten:
the node becomes pe-export's lowering of the requested target on the same float64-built tables.

    op ort:  com.microsoft::RotaryEmbedding(x, position_ids, cos, sin)        (a contrib node is already it)
    op onnx: RotaryEmbedding-23(x, cos, sin, position_ids)                     (a standard node is already it)
    op decomposed: Gather/Mul/Add (`rotate_half.lower_decomposed`), halves pairing, whole head, x (B, H, S, D)

`interleaved`, `rotary_embedding_dim` and `num_heads` carry over between the two fused ops. A conversion
that cannot keep the node's arithmetic is refused before anything changes (`conversion_refusal`): the
contrib op's `scale` != 1 or packed batching, 1D (offset) positions, x of unknown rank; for decomposed
also 3D x, interleaved pairs or a partial rotary dim. A node already of the target counts as rotated
when its caches are rewritten (`is_target`).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.rewriter import emit
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.rotate_half import lower_decomposed

CONTRIB = "com.microsoft"
TARGET_DOMAIN = {"ort": CONTRIB, "onnx": ""}
SHARED_ATTRS = ("interleaved", "rotary_embedding_dim", "num_heads")
CONTRIB_DEFAULTS = {"scale": 1.0, "is_packed_batching": 0}


def attr(node: ir.Node, name: str, default=0):
    a = node.attributes.get(name)
    return default if a is None else a.value


def is_target(domain: str, op: str) -> bool:
    return op in TARGET_DOMAIN and TARGET_DOMAIN[op] == domain


def conversion_refusal(node: ir.Node, x: ir.Value, position_ids: ir.Value, op: str) -> str | None:
    """Why `node` cannot become --op `op`'s lowering, or None (also when it already is the target)."""
    if op == "tables" or is_target(node.domain, op):
        return None
    what = f"--op {op}: the graph's {node.domain or 'ai.onnx'}::RotaryEmbedding"
    for name, default in CONTRIB_DEFAULTS.items():
        if attr(node, name, default) != default:
            return (
                f"{what} has {name}={attr(node, name)}, which the {op} lowering has no counterpart for; use --op tables"
            )
    rank = position_ids.shape.rank() if position_ids.shape is not None else None
    if rank != 2:
        return f"{what} reads positions of rank {rank} (the (B, S) form is needed); use --op tables"
    x_rank = x.shape.rank() if x.shape is not None else None
    if x_rank not in (3, 4) or op == "decomposed" and x_rank != 4:
        return f"{what} rotates x of rank {x_rank} (decomposed needs (B, H, S, D)); use --op tables"
    if x_rank == 3 and not attr(node, "num_heads"):
        return f"{what} rotates 3D x without num_heads; use --op tables"
    if op == "decomposed":
        if attr(node, "interleaved"):
            return (
                f"{what} rotates interleaved pairs (the decomposed lowering here rotates halves); use --op tables "
                f"or ort"
            )
        rotary, head = attr(node, "rotary_embedding_dim"), x.shape[-1]
        if rotary and isinstance(head, int) and rotary != head:
            return f"{what} rotates {rotary} of {head} dims (partial rotary); use --op tables or ort"
    return None


def rebuild(op, node: ir.Node, domain: str, x, position_ids, cos_t, sin_t):
    """`node` as a RotaryEmbedding of `domain` on the tables (its shared attributes, and the contrib op's own
    when it stays a contrib node)."""
    attrs = {k: node.attributes[k].value for k in SHARED_ATTRS if k in node.attributes}
    if domain == CONTRIB:
        if node.domain == CONTRIB:
            attrs.update({k: node.attributes[k].value for k in CONTRIB_DEFAULTS if k in node.attributes})
        return op.RotaryEmbedding(x, position_ids, cos_t, sin_t, **attrs, _domain=CONTRIB, _version=1)
    return op.RotaryEmbedding(x, cos_t, sin_t, position_ids, **attrs, _version=23)


def node_pattern(op, domain: str, x, position_ids, cos_cache, sin_cache):
    """A RotaryEmbedding of `domain` (the two domains order their inputs differently)."""
    if domain == CONTRIB:
        return op.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, _domain=CONTRIB, _allow_other_attributes=True)
    return op.RotaryEmbedding(x, cos_cache, sin_cache, position_ids, _allow_other_attributes=True)


@RULES.register("fused_rotary")
class FusedRotary(pattern.RewriteRuleClassBase):
    kind = "rotation"
    order = 0
    functions = (CONTRIB, "ai.onnx")

    def __init__(self, job, fn):
        super().__init__(f"fused_rotary.{fn}")
        self.job = job
        self.domain = CONTRIB if fn == CONTRIB else ""
        self._found = None

    def pattern(self, op, x, position_ids, cos_cache, sin_cache):
        return node_pattern(op, self.domain, x, position_ids, cos_cache, sin_cache)

    def check(self, context, x, position_ids, cos_cache, sin_cache, **_):
        r = pattern.MatchResult()
        node = context.root
        site = next((s for s in self.job.sites if s.tables == [cos_cache.name, sin_cache.name]), None)
        if site is None:
            return r.fail("the caches are not a rewritten site's", cos_cache)
        if is_target(self.domain, self.job.op):
            return r.fail(f"already --op {self.job.op}'s node", node)
        reason = conversion_refusal(node, x, position_ids, self.job.op)
        if reason:  # refused in the first pass already, before anything changed
            return r.fail(reason, node)
        self._found = (node, site)
        return r

    def rewrite(self, op, x, position_ids, cos_cache, sin_cache, **_):
        node, site = self._found
        site.rotations += 1
        if self.job.op in TARGET_DOMAIN:
            return rebuild(op, node, TARGET_DOMAIN[self.job.op], x, position_ids, cos_cache, sin_cache)
        safe = emit.safe_positions(
            op, position_ids, site.params["max_positions"]
        )  # Gather wraps negatives: map them past the table
        return lower_decomposed(op, x, cos_cache, sin_cache, safe, site.params["rotary_dim"])
