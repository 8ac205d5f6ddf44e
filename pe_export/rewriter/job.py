"""The state of one rewrite: the config's parameter sets, what was found, and the tables built.

Rules record every site they rewrite (`Site`) and every site they recognise but must refuse (a config
that disagrees with the graph), so that the caller can fail with the reason before returning anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from pe_export.dtypes import numpy_dtype
from pe_export.encodings.rope import RopeParams, tables
from pe_export.rewriter import params as params_mod


@dataclass
class Site:
    """One rewritten cos/sin computation. `cos`/`sin` name the (..., R) values the model's rotations read."""

    rule: str
    inv_freq: str  # the graph's constant (or table) that was replaced
    positions: str  # the int64 positions value the new Gather reads
    cos: str  # the same name in the original and the rewritten graph
    sin: str
    params: dict
    tables: list[str]
    seq_len: int | None = None  # the rule's branch (LongRoPE short/long), None when it has one
    restored: str = ""  # a run-time behaviour the export had frozen and the rewrite put back (report text)
    rotations: int = 0  # q/k rotations replaced by --op onnx|ort|decomposed
    # cos/sin values (B, S, R) [t, t]; "half": (B, S, R/2); "repeated": (B, S, R) [t0, t0, t1, t1, ...];
    # "table": the (P, R/2) caches a fused node reads
    width: str = "full"
    fused: str = (
        ""  # the fused node that reads the tables ("com.microsoft::GroupQueryAttention", ...); "": the graph's own ops
    )
    replaced: list[str] = field(
        default_factory=list
    )  # further graph constants the tables replace (a fused node's sin cache)
    dtype: str = "fp32"  # the tables' (a fused node's caches keep the graph's dtype)
    offset: int = 0  # the row of the original's cache where the site's rows start (a concatenated cache)
    # Each replaced rotation: the un-rotated q or k `x` and the rotated `y` (the same names in the original
    # and the rewritten graph), its pairing and layout: what verification reads back from both.
    rotated: list = field(default_factory=list)
    # An M-RoPE site's rotations (`rewriter.mrope_rows`): for each pair j of the rows they read, c * R/2 + k,
    # the component c (temporal, height, width) and column k of the site's (3, B, S, R/2) cos/sin.
    sections: list = field(default_factory=list)

    def add_rotation(self, x: str, y: str, pairing: str, layout: str) -> None:
        self.rotations += 1
        self.rotated.append({"x": x, "y": y, "pairing": pairing, "layout": layout})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    candidates: list[RopeParams]
    seq: int | None
    op: str = "tables"
    sites: list[Site] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    site_index: dict = field(default_factory=dict)  # (inv_freq, positions, branch) -> Site
    found: set = field(default_factory=set)  # (rule, inv_freq) of every site whose check passed
    built: dict = field(default_factory=dict)  # a rule's replacement shared by the nodes reading it
    unlowered: list[str] = field(default_factory=list)  # why a rotation of a site could not be lowered (--op)
    _tables: dict = field(default_factory=dict)

    def table_params(self, p: RopeParams) -> RopeParams:
        return params_mod.with_seq(p, self.seq)

    def refuse(self, reason: str) -> str:
        self.refused.append(reason)
        return reason

    def forget_built(self) -> None:
        self.sites.clear()
        self.site_index.clear()
        self.built.clear()
        self._tables.clear()

    def tables_for(
        self,
        op,
        p: RopeParams,
        seq_len: int | None = None,
        label: str = "",
        rows: int | None = None,
        dtype: str = "fp32",
    ) -> tuple[ir.Value, ir.Value]:
        """The (P, R/2) cos and sin initializers of `p` (attention factor included) in `dtype`, built once
        in float64 and rounded once, shared by every site with the same parameters, branch and dtype;
        `rows`: only the first rows (a branch that serves fewer positions)."""
        p = self.table_params(p)
        key = (repr(p), seq_len, rows, dtype)
        if key not in self._tables:
            cos, sin = (t[:rows] for t in tables(p, seq_len))  # (P, R/2) float64
            name = f"pe_export.rope.{{}}_table_{len(self._tables)}{label}"
            self._tables[key] = tuple(
                op.initializer(ir.tensor(t.astype(numpy_dtype(dtype))), name=name.format(kind))
                for kind, t in (("cos", cos), ("sin", sin))
            )
        return self._tables[key]
