"""The interleaved rotation of q or k that transformers 5.23's GLM and Cohere write (`apply_rotary_pos_emb`
with `rotate_half` on pairs (2i, 2i + 1); GLM-4, and the partial-rotary slice of either), once its cos/sin
were rewritten. GLM: the full-width cos/sin [t, t] are cut to their first half and repeated per pair
(`cos[..., : R/2].repeat_interleave(2, dim=-1)`) before the rotation:

    x (B, H, S, R); cos4 = Unsqueeze(cos, 1) (B, 1, S, R)
    rep(t4) = Reshape(Expand(Unsqueeze(Slice(t4, 0:R/2, axis 3), 4), [1, 1, 1, 1, 2]), [..., -1])   (B, 1, S, R)
    Add(Mul(x, rep(cos4)), Mul(Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1), Unsqueeze(x[..., ::2], -1), -1)),
        rep(sin4)))

or Cohere's, whose cos/sin sites are already repeated per pair (`rules.cos_sin_repeated`): cos4 =
Unsqueeze(cos, 1) read as it is. Both replaced (--op onnx|ort|decomposed) by pe-export's lowering with
interleaved pairs on the site's (P, R/2) float64-built tables, heads before the sequence (bhsd). Same
pattern as `rotate_pairs` (GPT-J, whose cos/sin come from a Split of a sin/cos table); this rule's check
takes the repeat of a rewritten site.
"""

from __future__ import annotations

import functools

from onnxscript.rewriter import pattern

from pe_export.rewriter.emit import ints
from pe_export.rewriter.rules import RULES, rotate_half
from pe_export.rewriter.rules.rotate_half import _ints, every_other, site_tables
from pe_export.rewriter.rules.rotate_pairs import RotatePairs


def repeated_site(cos4):
    """Cohere's form: {"table", "positions", "cond"} behind Unsqueeze(cos, 1) of a `cos_sin_repeated` site,
    cos = Reshape(Concat(Unsqueeze(Gather(T, safe), -1), <the same>), [0, 0, R]), or None."""
    node = cos4.producer()
    if node is None or node.op_type != "Unsqueeze" or _ints(node.inputs[1]) != [1]:
        return None
    ops = []
    v = node.inputs[0]
    for op_type in ("Reshape", "Concat", "Unsqueeze", "Gather"):
        n = v.producer()
        if n is None or n.op_type != op_type or (op_type == "Concat" and n.inputs[0] is not n.inputs[1]):
            return None
        ops.append(n)
        v = n.inputs[0]
    table = ops[-1].inputs[0]
    if table.const_value is None or not (table.name or "").startswith("pe_export.rope."):
        return None
    return {"table": (table,), "positions": ops[-1].inputs[1], "cond": None}


def repeated_source(rep):
    """The Unsqueeze(cos, 1) (B, 1, S, R) behind rep(t4), and the half width R/2 it keeps, or None."""
    v = rep
    for op_type in ("Reshape", "Expand", "Unsqueeze"):
        node = v.producer()
        if node is None or node.op_type != op_type:
            return None
        if op_type == "Expand" and _ints(node.inputs[1]) not in ([1, 1, 1, 1, 2],):
            return None
        v = node.inputs[0]
    node = v.producer()
    if node is None or node.op_type != "Slice" or _ints(node.inputs[1]) != [0]:
        return None
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else None
    if axes not in ([-1], [3]) or (len(node.inputs) > 4 and _ints(node.inputs[4]) not in (None, [1])):
        return None
    half = _ints(node.inputs[2])
    return (node.inputs[0], half[0]) if half else None


@RULES.register("rotate_pairs_repeated")
class RotatePairsRepeated(RotatePairs):
    rule_name = "rotate_pairs_repeated"

    def check(self, context, x, cos_rep, sin_rep, odd, even, y, **_):
        r = pattern.MatchResult()
        cos, sin = repeated_site(cos_rep), repeated_site(sin_rep)  # Cohere: the site itself is repeated
        if cos is None or sin is None:
            c, s = repeated_source(cos_rep), repeated_source(sin_rep)  # GLM: the rotation repeats [t, t]
            if c is None or s is None:
                return r.fail("cos/sin are not repeated per pair (repeat_interleave)", cos_rep)
            cos, sin = site_tables(c[0]), site_tables(s[0])
            if cos is None or sin is None:
                return r.fail("the repeated cos/sin are not a rewritten site's", cos_rep)
            if c[1] != cos["table"][0].shape[-1] or s[1] != c[1]:
                return r.fail(f"the repeat keeps {c[1]} of the {cos['table'][0].shape[-1]} table columns", cos_rep)
        half = cos["table"][0].shape[-1]
        if not every_other(odd, even, (1, 0)):
            return r.fail("the slices are not x[..., 1::2] and x[..., ::2]", odd)
        refusal = self.x_refusal(x, half)
        if refusal:
            return r.fail(refusal, x)
        self._found = (cos, sin, half, y.name)
        return r

    def rewrite(self, op, x, **_):
        cos, sin, half, y = self._found
        self.record(cos["table"], x, y, "interleaved")
        return LOWERINGS[self.job.op](op, x, self.table(op, cos), self.table(op, sin), cos["positions"], 2 * half)


def lower_decomposed(op, x, cos_t, sin_t, positions, rotary_dim):
    """y = x * [c0, c0, c1, c1, ...] + swap(x) * [-s0, s0, -s1, s1, ...], bhsd (custom_ops.lowerings)."""
    half = rotary_dim // 2
    last = ints(op, [-1])

    def per_pair(t, sign):  # (B, S, R/2) -> (B, 1, S, R): each value twice, the first of each pair signed
        first = op.Neg(t) if sign else t
        pairs = op.Concat(op.Unsqueeze(first, last), op.Unsqueeze(t, last), axis=-1)  # (B, S, R/2, 2)
        return op.Unsqueeze(op.Reshape(pairs, ints(op, [0, 0, rotary_dim])), ints(op, [1]))

    cos = per_pair(op.Gather(cos_t, positions), False)
    sin = per_pair(op.Gather(sin_t, positions), True)
    pairs = op.Reshape(x, ints(op, [0, 0, 0, half, 2]))  # (B, H, S, R/2, 2)
    even = op.Slice(pairs, ints(op, [0]), ints(op, [1]), last)
    odd = op.Slice(pairs, ints(op, [1]), ints(op, [2]), last)
    swapped = op.Reshape(op.Concat(odd, even, axis=-1), ints(op, [0, 0, 0, rotary_dim]))
    return op.Add(op.Mul(x, cos), op.Mul(swapped, sin))


# The fused ops take interleaved pairs on (B, H, S, R) as rotate_half's do halves: the same lowering, interleaved=1.
LOWERINGS = {
    "onnx": functools.partial(rotate_half.lower_onnx, interleaved=1),
    "ort": functools.partial(rotate_half.lower_ort, interleaved=1),
    "decomposed": lower_decomposed,
}
