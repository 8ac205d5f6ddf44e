"""Cohere's rotary forward (transformers 5.23 `CohereRotaryEmbedding`), as torch.onnx.export(dynamo=True)
writes it: the angles are repeated per pair (`torch.repeat_interleave(freqs, 2, dim=-1)`) before Cos/Sin,
for rotations on interleaved pairs (2i, 2i + 1):

    position_ids (B, S) -> Unsqueeze(-1) -> Cast(FLOAT) -> Mul(., inv_freq (R/2,))           (B, S, R/2)
    -> Unsqueeze(3) -> Expand([1, 1, 1, 2]) -> Reshape([..., -1]) -> Cos, Sin               (B, S, R)
    [-> Mul(attention factor): `cos_sin_repeated_factor`]

replaced by the Gather of the float64-built (P, R/2) tables, repeated per pair the same way
(`Site.width == "repeated"`: [t0, t0, t1, t1, ...]).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.encodings.rope import computed_in_graph
from pe_export.rewriter import emit
from pe_export.rewriter.emit import ints
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import ConstantFreqRule
from pe_export.rewriter.rules.rotate_half import _ints


def angles(op, position_ids, axes, inv_freq):
    freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)  # (B, S, R/2)
    pairs = op.Expand(op.Unsqueeze(freqs, _allow_other_inputs=True), _allow_other_inputs=True, _outputs=["pairs"])
    return op.Reshape(pairs, _allow_other_inputs=True)  # (B, S, R): [f0, f0, f1, f1, ...]


def repeat_per_pair(op, half: ir.Value, rotary_dim: int) -> ir.Value:
    """(B, S, R/2) -> (B, S, R) [t0, t0, t1, t1, ...] (what `repeat_interleave(t, 2, dim=-1)` gives)."""
    column = op.Unsqueeze(half, ints(op, [-1]))  # (B, S, R/2, 1)
    pairs = op.Concat(column, column, axis=-1)  # (B, S, R/2, 2)
    return op.Reshape(pairs, ints(op, [0, 0, rotary_dim]))


class RepeatedRule(ConstantFreqRule):
    def check(self, context, position_ids, axes, inv_freq, pairs=None, factor=None, **_):
        r = pattern.MatchResult()
        expand = pairs.producer()
        unsqueeze = expand.inputs[0].producer()
        if _ints(expand.inputs[1]) != [1, 1, 1, 2] or _ints(unsqueeze.inputs[1]) not in ([3], [-1]):
            return r.fail("the angles are not repeated per pair on a new last axis", pairs)
        r = super().check(context, position_ids, axes, inv_freq, factor)
        if r and computed_in_graph(self._p):
            return r.fail("dynamic NTK's run-time frequencies are not supported for pairs repeated per pair", inv_freq)
        return r

    def rewrite(self, op, position_ids, inv_freq, **_):
        p = self._p
        site = self.record(inv_freq, position_ids, self._out, p)
        site.width = "repeated"
        tables = self.job.tables_for(op, p)
        site.tables = [t.name for t in tables]
        rows = self.job.table_params(p).max_positions
        half = op.Gather(tables[0 if self.fn == "Cos" else 1], emit.safe_positions(op, position_ids, rows))
        return repeat_per_pair(op, half, p.rotary_dim)  # (B, S, R)


@RULES.register("cos_sin_repeated")
class CosSinRepeated(RepeatedRule):
    rule_name = "cos_sin_repeated"

    def pattern(self, op, position_ids, axes, inv_freq):
        return self.trig(op, angles(op, position_ids, axes, inv_freq))


@RULES.register("cos_sin_repeated_factor")
class CosSinRepeatedFactor(RepeatedRule):
    rule_name = "cos_sin_repeated_factor"
    order = 0  # contains cos_sin_repeated's shape

    def pattern(self, op, position_ids, axes, inv_freq, factor):
        return op.Mul(self.trig(op, angles(op, position_ids, axes, inv_freq)), factor)
