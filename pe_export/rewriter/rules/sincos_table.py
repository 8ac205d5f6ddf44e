"""GPT-J: a precomputed float32 table `embed_positions` (P, R) = [sin | cos] (transformers'
`create_sinusoidal_positions`, float32 angles), which torch.onnx.export(dynamo=True) writes as

    embed_positions (P, R) -> Expand -> Tile(B) -> GatherElements(position_ids, axis=1) -> Split(2, axis=2)
    -> sin, cos (B, S, R/2), repeated per pair (interleaved) by the attention

The table is checked against the config's parameters with float32 angles (the arithmetic that built it:
within `TABLE_ULPS` of it, so theta, rotary dim and rows are those of the config), then replaced by the
same layout built from float64 angles, of --seq rows (default: the config's max_position_embeddings).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.encodings.rope import tables
from pe_export.rewriter.job import Site
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import CosSinRule, site_params

TABLE_ULPS = 4  # torch's float32 sin/cos against float32 angles' sin/cos taken in float64, rounded


def sincos_rows(p, float32_angles: bool) -> np.ndarray:
    """(P, R) [sin | cos] of `p` (attention factor included)."""
    cos, sin = tables(replace(p, angles="float32" if float32_angles else "float64"))  # (P, R/2) each
    return np.concatenate([sin, cos], axis=1)


def split_outputs(expanded: ir.Value) -> tuple[str, str] | None:
    """(sin, cos) names of the Split after Expand -> Tile -> GatherElements, if the graph has that chain."""
    value = expanded
    for op_type in ("Tile", "GatherElements", "Split"):
        users = [u.node for u in value.uses() if u.node.op_type == op_type]
        if len(users) != 1:
            return None
        if op_type == "Split":
            outs = users[0].outputs
            return (outs[0].name, outs[1].name) if len(outs) == 2 else None
        value = users[0].outputs[0]
    return None


@RULES.register("sincos_table")
class SinCosTable(CosSinRule):
    rule_name = "sincos_table"
    functions = ("SinCos",)

    def pattern(self, op, table, shape):
        return op.Expand(table, shape, _outputs=["expanded"])

    def check(self, context, table, shape, expanded, **_):
        r = pattern.MatchResult()
        value = table.const_value
        if value is None or value.dtype != ir.DataType.FLOAT or len(value.shape) != 2:
            return r.fail("not a float32 (P, R) constant table", table)
        if split_outputs(expanded) is None:
            return r.fail("the table is not read by Tile -> GatherElements -> Split (GPT-J's shape)", expanded)
        g = value.numpy()
        rows, width = g.shape
        reasons = []
        for p in self.job.candidates:
            p_rows = replace(p, max_positions=rows)
            if width != p.rotary_dim:
                reasons.append(
                    f"rotary dim: the graph's sin/cos table is {width} wide, the config gives rotary dim {p.rotary_dim}"
                )
                continue
            if p.pairing != "interleaved":
                reasons.append(
                    "pairing: the graph's sin/cos table is GPT-J's (interleaved pairs), the config's pairing is 'half'"
                )
                continue
            err = float(np.abs(g.astype(np.float64) - sincos_rows(p_rows, float32_angles=True)).max())
            if err > TABLE_ULPS * 2.0**-24:
                reasons.append(
                    f"theta: the graph's sin/cos table differs from the config's (theta {p.theta:g}, rotary dim "
                    f"{p.rotary_dim}) by {err:.2e}"
                )
                continue
            self._p = p
            self.job.found.add((self.rule_name, table.name))
            return r
        reason = "; ".join(dict.fromkeys(reasons))
        self.job.refuse(f"{reason} (site {table.name!r})")
        return r.fail(reason, table)

    def rewrite(self, op, table, shape, expanded, **_):
        p = self.job.table_params(self._p)
        key = ("sincos", repr(p))
        if key not in self.job._tables:
            t = sincos_rows(p, float32_angles=False).astype(np.float32)
            self.job._tables[key] = (
                op.initializer(ir.tensor(t), name=f"pe_export.rope.sincos_table_{len(self.job._tables)}"),
            )
        new = self.job._tables[key][0]
        sin, cos = split_outputs(expanded)
        self.job.sites.append(
            Site(
                rule=self.rule_name,
                inv_freq=table.name,
                positions="",
                cos=cos,
                sin=sin,
                params=site_params(p),
                tables=[new.name],
                width="half",
            )
        )
        return op.Expand(new, shape)
