"""The rotate-half rotation of q or k that transformers' `apply_rotary_pos_emb` writes (Llama, Mistral,
Qwen2, Gemma, Phi-3, and GPT-NeoX's rotated slice), once its cos/sin were rewritten:

    x (B, H, S, R), cos4 = Unsqueeze(cos, 1), sin4 = Unsqueeze(sin, 1)        (B, 1, S, R)
    Add(Mul(x, cos4), Mul(Concat(Neg(Slice(x, R/2:)), Slice(x, :R/2), axis=-1), sin4))

replaced (--op onnx|ort|decomposed) by pe-export's lowering of that target on the site's tables
(`custom_ops/lowerings.py`; the same arithmetic written with the rewriter's builder): one opset-23
`RotaryEmbedding`, one `com.microsoft::RotaryEmbedding`, or the decomposed Gather/Mul/Add form. A
LongRoPE site feeds the lowering Where(cond, long table, short table), keeping the run-time switch. An
M-RoPE text site (cos = Concat(f, f), f the graph's section selection of the (3, B, S, R/2) rows) feeds
it the per-token rows as a (B*S, R/2) table read at arange(B*S) (`pe_export.rewriter.mrope_rows`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.rewriter import mrope_rows
from pe_export.rewriter.emit import ints
from pe_export.rewriter.rules import RULES


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def every_other(first: ir.Value, second: ir.Value, starts: tuple[int, int]) -> bool:
    """`first` and `second` are Slice(x, start, _, _, 2) from `starts`: the two members of interleaved pairs
    (x[..., 0::2] and x[..., 1::2] in either order)."""
    for value, start in zip((first, second), starts):
        node = value.producer()
        if node is None or len(node.inputs) < 5 or _ints(node.inputs[1]) != [start] or _ints(node.inputs[4]) != [2]:
            return False
    return True


def site_tables(cos4: ir.Value):
    """(cos table, sin table-free key, safe positions, cond) behind Unsqueeze(cos, 1) of a rewritten site:
    cos = Concat(Gather(T, safe), ...) or Where(cond, Concat(Gather(T_long, safe)), Concat(Gather(T_short, safe)))."""
    node = cos4.producer()
    if node is None or node.op_type != "Unsqueeze" or _ints(node.inputs[1]) != [1]:
        return None
    value = node.inputs[0]

    def gathered(v):
        concat = v.producer()
        if concat is None or concat.op_type != "Concat" or concat.inputs[0] is not concat.inputs[1]:
            return None
        gather = concat.inputs[0].producer()
        if gather is None or gather.op_type != "Gather" or gather.inputs[0].const_value is None:
            return None
        if not (gather.inputs[0].name or "").startswith("pe_export.rope."):
            return None
        return gather.inputs[0], gather.inputs[1]

    node = value.producer()
    if node is not None and node.op_type == "Where":
        long, short = gathered(node.inputs[1]), gathered(node.inputs[2])
        if long is None or short is None:
            return None
        return {"table": (long[0], short[0]), "positions": short[1], "cond": node.inputs[0]}
    one = gathered(value)
    return None if one is None else {"table": (one[0],), "positions": one[1], "cond": None}


def doubled(cos4: ir.Value) -> ir.Value | None:
    """f of Unsqueeze(Concat(f, f), 1), or None."""
    node = cos4.producer()
    if node is None or node.op_type != "Unsqueeze" or _ints(node.inputs[1]) != [1]:
        return None
    concat = node.inputs[0].producer()
    if (
        concat is None
        or concat.op_type != "Concat"
        or len(concat.inputs) != 2
        or concat.inputs[0] is not concat.inputs[1]
    ):
        return None
    return concat.inputs[0]


class RotationRule(pattern.RewriteRuleClassBase):
    """What the q/k rotation rules share (kind "rotation", run after the cos/sin rules): the job, the
    match `check` found, the shape check of x, the table a lowering reads and the site's record."""

    kind = "rotation"
    order = 0
    functions = (None,)
    rule_name = ""

    def __init__(self, job, fn=None):
        super().__init__(self.rule_name)
        self.job = job
        self._found = None

    @staticmethod
    def x_refusal(x: ir.Value, half: int) -> str | None:
        """Why x is not the (B, H, S, R) input of a rotation by (P, R/2) tables, or None."""
        if x.shape is not None and x.shape.rank() is not None and x.shape.rank() != 4:
            return "x is not (B, H, S, R)"
        if x.shape is not None and isinstance(x.shape[-1], int) and x.shape[-1] != 2 * half:
            return f"x is {x.shape[-1]} wide, the tables {2 * half}"
        return None

    @staticmethod
    def table(op, found: dict) -> ir.Value:
        """The (P, R/2) table a lowering reads: a LongRoPE site's Where(cond, long, short), an M-RoPE site's
        per-token rows (B*S, R/2), else its one table."""
        if "select" in found:
            return mrope_rows.rows(op, found)
        return found["table"][0] if found["cond"] is None else op.Where(found["cond"], *found["table"])

    @staticmethod
    def positions(op, found: dict) -> ir.Value:
        """The (B, S) positions a lowering reads: the site's (negatives already mapped to P), or for an
        M-RoPE site each token's row of `table`."""
        if "select" in found:
            return mrope_rows.token_positions(op, found["positions"])
        return found["positions"]

    def record(self, tables, x: ir.Value, y: str, pairing: str, sections=None) -> None:
        """Note the rotation on the site whose tables these are (the checks compare it in float64)."""
        for site in self.job.sites:
            if any(t.name in site.tables for t in tables):
                site.add_rotation(x.name, y, pairing, "bhsd")
                if sections is not None:
                    site.sections = [int(i) for i in sections]


@RULES.register("rotate_half")
class RotateHalf(RotationRule):
    rule_name = "rotate_half"

    def pattern(self, op, x, cos4, sin4):
        x1 = op.Slice(x, _allow_other_inputs=True, _outputs=["x1"])
        x2 = op.Slice(x, _allow_other_inputs=True, _outputs=["x2"])
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos4), op.Mul(rotated, sin4), _outputs=["y"])

    def check(self, context, x, cos4, sin4, x1, x2, y, **_):
        r = pattern.MatchResult()
        cos, sin = site_tables(cos4), site_tables(sin4)
        if cos is None or sin is None:  # an M-RoPE site: the graph's section selection between Gather and Concat
            cos, sin = mrope_rows.site_rows(doubled(cos4)), mrope_rows.site_rows(doubled(sin4))
            reason = next((v for v in (cos, sin) if isinstance(v, str)), None)
            if not reason and cos is not None and sin is not None and list(cos["select"]) != list(sin["select"]):
                reason = f"cos selects pairs {list(cos['select'])}, sin {list(sin['select'])}"
            if reason:
                self.job.unlowered.append(f"M-RoPE: {reason}")
            if reason or cos is None or sin is None:
                return r.fail(reason or "cos/sin are not a rewritten site's (run the cos/sin rules first)", cos4)
        half = cos["table"][0].shape[-1]
        s1, s2 = x1.producer(), x2.producer()
        a1, a2 = (
            _ints(s1.inputs[3]) if len(s1.inputs) > 3 else [-1],
            _ints(s2.inputs[3]) if len(s2.inputs) > 3 else [-1],
        )
        if _ints(s1.inputs[1]) != [0] or _ints(s1.inputs[2]) != [half] or _ints(s2.inputs[1]) != [half]:
            return r.fail("the slices are not the two halves of the rotary dim", x1)
        if (_ints(s2.inputs[2]) or [0])[0] < 2 * half or a1 not in ([-1], [3]) or a2 not in ([-1], [3]):
            return r.fail("the slices are not on the last axis", x2)
        refusal = self.x_refusal(x, half)
        if refusal:
            return r.fail(refusal, x)
        self._found = (cos, sin, half, y.name)
        return r

    def rewrite(self, op, x, **_):
        cos, sin, half, y = self._found
        self.record(cos["table"], x, y, "half", cos.get("select"))
        positions = self.positions(op, cos)  # already mapped: negative -> P
        return LOWERINGS[self.job.op](op, x, self.table(op, cos), self.table(op, sin), positions, 2 * half)


def lower_onnx(op, x, cos_t, sin_t, positions, rotary_dim, interleaved: int = 0):
    return op.RotaryEmbedding(x, cos_t, sin_t, positions, interleaved=interleaved, _version=23)  # (B, H, S, R)


def lower_ort(op, x, cos_t, sin_t, positions, rotary_dim, interleaved: int = 0):
    return op.RotaryEmbedding(
        x, positions, cos_t, sin_t, interleaved=interleaved, _domain="com.microsoft", _version=1
    )  # (B, H, S, R)


def lower_decomposed(op, x, cos_t, sin_t, positions, rotary_dim):
    """y = x * [c, c] + swap(x) * [-s, s], as `custom_ops.lowerings.lower_decomposed` (half pairing, bhsd)."""
    half = rotary_dim // 2
    sin = op.Gather(sin_t, positions)  # (B, S, R/2)
    cos = op.Gather(op.Concat(cos_t, cos_t, axis=-1), positions)  # (B, S, R)
    sin = op.Concat(op.Neg(sin), sin, axis=-1)  # (B, S, R)
    halves = op.Reshape(x, ints(op, [0, 0, 0, 2, half]))  # (B, H, S, 2, R/2)
    swapped = op.Reshape(op.Gather(halves, ints(op, [1, 0]), axis=-2), ints(op, [0, 0, 0, rotary_dim]))
    axis = ints(op, [1])
    return op.Add(op.Mul(x, op.Unsqueeze(cos, axis)), op.Mul(swapped, op.Unsqueeze(sin, axis)))


LOWERINGS = {"onnx": lower_onnx, "ort": lower_ort, "decomposed": lower_decomposed}
