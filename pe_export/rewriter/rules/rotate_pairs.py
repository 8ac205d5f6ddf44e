"""GPT-J's interleaved rotation (transformers' `rotate_every_two`, pairs (2i, 2i + 1)) of q or k, bshd,
once its sin/cos table was rewritten:

    x (B, S, H, R); c, s (B, S, R/2) from the table's Split, repeated per pair:
    rep(t) = Reshape(Expand(Unsqueeze(Unsqueeze(t, 2), 4), [1, 1, 1, 1, 2]))      (B, S, 1, R)
    Add(Mul(x, rep(c)), Mul(Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1), Unsqueeze(x[..., ::2], -1), -1)), rep(s)))

replaced (--op onnx|ort|decomposed) by pe-export's lowering with `interleaved=1` on (P, R/2) cos and sin
tables built in float64 (the same values as the rewritten [sin | cos] table).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.encodings.rope import RopeParams
from pe_export.rewriter import emit
from pe_export.rewriter.emit import ints
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.rotate_half import RotationRule, every_other


def split_source(rep: ir.Value):
    """The Split output behind rep(t), or None."""
    v = rep
    for op_type in ("Reshape", "Expand", "Unsqueeze", "Unsqueeze"):
        node = v.producer()
        if node is None or node.op_type != op_type:
            return None
        v = node.inputs[0]
    node = v.producer()
    return v if node is not None and node.op_type == "Split" else None


def raw_positions(split_out: ir.Value) -> ir.Value | None:
    """position_ids (B, S) behind GatherElements(table, Tile(Unsqueeze(position_ids, -1)))."""
    gather = split_out.producer().inputs[0].producer()
    if gather is None or gather.op_type != "GatherElements":
        return None
    v = gather.inputs[1]
    for _ in range(4):
        node = v.producer()
        if node is None:
            return v if v.dtype == ir.DataType.INT64 else None
        if node.op_type == "Unsqueeze":
            return node.inputs[0]
        v = node.inputs[0]
    return None


@RULES.register("rotate_pairs")
class RotatePairs(RotationRule):
    rule_name = "rotate_pairs"

    def pattern(self, op, x, cos_rep, sin_rep):
        odd = op.Slice(x, _allow_other_inputs=True, _outputs=["odd"])
        even = op.Slice(x, _allow_other_inputs=True, _outputs=["even"])
        stacked = op.Concat(
            op.Unsqueeze(op.Neg(odd), _allow_other_inputs=True), op.Unsqueeze(even, _allow_other_inputs=True), axis=-1
        )
        rotated = op.Reshape(stacked, _allow_other_inputs=True)
        return op.Add(op.Mul(x, cos_rep), op.Mul(rotated, sin_rep), _outputs=["y"])

    def check(self, context, x, cos_rep, sin_rep, odd, even, y, **_):
        r = pattern.MatchResult()
        c, s = split_source(cos_rep), split_source(sin_rep)
        site = next(
            (st for st in self.job.sites if c is not None and st.cos == c.name and s is not None and st.sin == s.name),
            None,
        )
        if site is None:
            return r.fail("cos/sin are not a rewritten sin/cos table's", cos_rep)
        if not every_other(odd, even, (1, 0)):
            return r.fail("the slices are not x[..., 1::2] and x[..., ::2]", odd)
        positions = raw_positions(c)
        if positions is None:
            return r.fail("no int64 positions behind the table's GatherElements", c)
        if x.shape is not None and x.shape.rank() not in (None, 4):
            return r.fail("x is not (B, S, H, R)", x)
        self._found = (site, positions, y.name)
        return r

    def rewrite(self, op, x, **_):
        site, positions, y = self._found
        site.add_rotation(x.name, y, "interleaved", "bshd")
        p = RopeParams(**site.params)
        cos_t, sin_t = self.job.tables_for(op, p)  # (P, R/2), float64-built, the rewritten table's values
        safe = emit.safe_positions(op, positions, p.max_positions)
        return LOWERINGS[self.job.op](op, x, cos_t, sin_t, safe, p.rotary_dim)


def lower_onnx(op, x, cos_t, sin_t, positions, rotary_dim):
    x = op.Transpose(x, perm=[0, 2, 1, 3])  # (B, H, S, R): the standard op reads 4D as heads-before-seq
    y = op.RotaryEmbedding(x, cos_t, sin_t, positions, interleaved=1, _version=23)
    return op.Transpose(y, perm=[0, 2, 1, 3])


def lower_ort(op, x, cos_t, sin_t, positions, rotary_dim):
    shape = op.Shape(x)
    y = op.RotaryEmbedding(
        op.Reshape(x, ints(op, [0, 0, -1])), positions, cos_t, sin_t, interleaved=1, _domain="com.microsoft", _version=1
    )  # (B, S, H*R): head size R read off the tables
    return op.Reshape(y, shape)


def lower_decomposed(op, x, cos_t, sin_t, positions, rotary_dim):
    """y = x * [c0, c0, c1, c1, ...] + swap(x) * [-s0, s0, -s1, s1, ...], bshd (custom_ops.lowerings)."""
    half = rotary_dim // 2
    last = ints(op, [-1])
    cos = op.Reshape(
        op.Concat(op.Unsqueeze(cos_t, last), op.Unsqueeze(cos_t, last), axis=-1), ints(op, [0, rotary_dim])
    )  # (P, R)
    sin = op.Gather(sin_t, positions)  # (B, S, R/2)
    sin = op.Reshape(
        op.Concat(op.Unsqueeze(op.Neg(sin), last), op.Unsqueeze(sin, last), axis=-1), ints(op, [0, 0, rotary_dim])
    )
    pairs = op.Reshape(x, ints(op, [0, 0, 0, half, 2]))  # (B, S, H, R/2, 2)
    even = op.Slice(pairs, ints(op, [0]), ints(op, [1]), last)
    odd = op.Slice(pairs, ints(op, [1]), ints(op, [2]), last)
    swapped = op.Reshape(op.Concat(odd, even, axis=-1), ints(op, [0, 0, 0, rotary_dim]))
    axis = ints(op, [2])
    cos = op.Unsqueeze(op.Gather(cos, positions), axis)  # (B, S, 1, R)
    return op.Add(op.Mul(x, cos), op.Mul(swapped, op.Unsqueeze(sin, axis)))


LOWERINGS = {"onnx": lower_onnx, "ort": lower_ort, "decomposed": lower_decomposed}
