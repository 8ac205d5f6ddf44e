"""DeepSeek-V3's interleaved rotation with `rope_interleave` (transformers 5.23
`apply_rotary_pos_emb_interleave`: q viewed (..., R/2, 2), transposed and reshaped, then `rotate_half`),
as torch.onnx.export(dynamo=True) writes it, once its cos/sin were rewritten: the pairs (2i, 2i + 1) are
rotated and written out as halves [rotated evens | rotated odds]:

    x (B, H, S, R); even = x[..., 0::2], odd = x[..., 1::2]                     (B, H, S, R/2)
    c4 = Unsqueeze(Slice(cos, 0:R/2, last axis), 1), s4 likewise             (B, 1, S, R/2)
    y = Concat(Sub(Mul(even, c4), Mul(odd, s4)), Add(Mul(odd, c4), Mul(even, s4)), axis=-1)   (B, H, S, R)

which is the half-pairing rotation of Concat(even, odd): replaced (--op onnx|ort|decomposed) by
`rotate_half`'s lowering of that target on the site's (P, R/2) float64-built tables. Verified as pairing
"interleaved_to_half" (`checks.rotation_error` de-interleaves x before its float64 rotation).
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from pe_export.rewriter.emit import ints
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.rotate_half import LOWERINGS, RotationRule, _ints, every_other


def half_site(c4):
    """{"table", "positions"} behind Unsqueeze(Slice(cos, 0:R/2), 1) of a rewritten site whose cos is
    Concat(Gather(T, safe), <the same>) (B, S, R), or None."""
    node = c4.producer()
    if node is None or node.op_type != "Unsqueeze" or _ints(node.inputs[1]) != [1]:
        return None
    cut = node.inputs[0].producer()
    if cut is None or cut.op_type != "Slice" or _ints(cut.inputs[1]) != [0]:
        return None
    if (len(cut.inputs) > 3 and _ints(cut.inputs[3]) not in ([-1], [2])) or (
        len(cut.inputs) > 4 and _ints(cut.inputs[4]) not in (None, [1])
    ):
        return None
    concat = cut.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or concat.inputs[0] is not concat.inputs[1]:
        return None
    gather = concat.inputs[0].producer()
    if gather is None or gather.op_type != "Gather":
        return None
    table = gather.inputs[0]
    if table.const_value is None or not (table.name or "").startswith("pe_export.rope."):
        return None
    if _ints(cut.inputs[2]) != [table.shape[-1]]:
        return None
    return {"table": table, "positions": gather.inputs[1]}


@RULES.register("rotate_pairs_to_halves")
class RotatePairsToHalves(RotationRule):
    rule_name = "rotate_pairs_to_halves"

    def pattern(self, op, x, c4, s4):
        even = op.Slice(x, _allow_other_inputs=True, _outputs=["even"])
        odd = op.Slice(x, _allow_other_inputs=True, _outputs=["odd"])
        first = op.Sub(op.Mul(even, c4), op.Mul(odd, s4))
        second = op.Add(op.Mul(odd, c4), op.Mul(even, s4))
        return op.Concat(first, second, axis=-1, _outputs=["y"])

    def check(self, context, x, c4, s4, even, odd, y, **_):
        r = pattern.MatchResult()
        cos, sin = half_site(c4), half_site(s4)
        if cos is None or sin is None:
            return r.fail("cos/sin are not the first half of a rewritten site's", c4)
        if not every_other(even, odd, (0, 1)):
            return r.fail("the slices are not x[..., 0::2] and x[..., 1::2]", even)
        half = cos["table"].shape[-1]
        refusal = self.x_refusal(x, half)
        if refusal:
            return r.fail(refusal, x)
        self._found = (cos, sin, half, y.name)
        return r

    def rewrite(self, op, x, **_):
        cos, sin, half, y = self._found
        self.record([cos["table"]], x, y, "interleaved_to_half")
        R, last, two = 2 * half, ints(op, [-1]), ints(op, [2])
        even = op.Slice(x, ints(op, [0]), ints(op, [R]), last, two)  # (B, H, S, R/2); the matched slices go
        odd = op.Slice(x, ints(op, [1]), ints(op, [R]), last, two)
        halves = op.Concat(even, odd, axis=-1)  # (B, H, S, R): [evens | odds], half pairing
        return LOWERINGS[self.job.op](op, halves, cos["table"], sin["table"], cos["positions"], 2 * half)
