"""What the cos/sin rules share: reading a constant `inv_freq`, naming the parameter that disagrees,
and recording the site."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.encodings.rope import computed_in_graph, switch_at
from pe_export.rewriter import dynamic_ntk, emit
from pe_export.rewriter import params as params_mod
from pe_export.rewriter.job import Job, Site


class CosSinRule(pattern.RewriteRuleClassBase):
    """The Cos (or the Sin) half of a cos/sin computation, replaced by a Gather of its table
    (`emit.gather`): subclasses give `pattern` and may extend `check`. One instance per function:
    single-output patterns keep onnxscript's matcher linear in the graph (a two-output pattern tries
    every pair of candidate output nodes). The angles feed both Cos and Sin, so the matched nodes stay
    until the rule set's final unused-node pass.
    `order`: rules with a smaller order are tried first (a shape that contains another's goes first)."""

    order = 1
    kind = "cos_sin"
    functions = ("Cos", "Sin")

    def __init__(self, job: Job, fn: str):
        super().__init__(f"{self.rule_name}.{fn.lower()}", remove_nodes=False)
        self.job = job
        self.fn = fn
        self._p = None
        self._frozen = None

    def trig(self, op, emb):
        return op.Cos(emb) if self.fn == "Cos" else op.Sin(emb)

    def check_positions(self, r: pattern.MatchResult, position_ids: ir.Value, axes: ir.Value | None):
        if position_ids.dtype not in (None, ir.DataType.INT64):
            return r.fail(f"positions are {position_ids.dtype}, not int64", position_ids)
        if axes is not None:
            a = axes.const_value
            rank = position_ids.shape.rank() if position_ids.shape is not None else None
            if a is None or [int(v) for v in a.numpy().reshape(-1)] not in ([-1], [rank]):
                return r.fail("the positions are not unsqueezed on a new last axis", axes)
        return r

    def constant_freqs(self, r: pattern.MatchResult, inv_freq: ir.Value) -> np.ndarray | None:
        value = inv_freq.const_value
        if value is None:
            r.fail("inv_freq is not a constant", inv_freq)
            return None
        g = value.numpy()
        if g.dtype != np.float32 or sum(d > 1 for d in g.shape) > 1:
            r.fail(f"inv_freq is {g.dtype} of shape {g.shape}, not float32 (R/2,)", inv_freq)
            return None
        return g.reshape(-1)

    def match_params(self, r: pattern.MatchResult, inv_freq: ir.Value, g: np.ndarray, seq_len: int | None = None):
        p, reason = params_mod.match(g, self.job.candidates, seq_len)
        if p is None:
            self.job.refuse(f"{reason} (site {inv_freq.name!r})")
            r.fail(reason, inv_freq)
        return p

    def factor_of(self, r: pattern.MatchResult, *factors: ir.Value) -> float | None:
        values = []
        for f in factors:
            v = f.const_value
            if v is None or v.numpy().size != 1:
                r.fail("the attention factor is not a scalar constant", f)
                return None
            values.append(float(v.numpy().reshape(())))
        if len(set(values)) != 1:
            r.fail(f"cos and sin are multiplied by different factors {values}")
            return None
        return values[0]

    def check_factor(
        self, r: pattern.MatchResult, inv_freq: ir.Value, p, graph_factor: float, seq_len: int | None = None
    ):
        """The last step of every check: the factor agrees, and the site counts as found."""
        reason = params_mod.factor_disagreement(graph_factor, p, seq_len)
        if reason:
            self.job.refuse(f"{reason} (site {inv_freq.name!r})")
            return r.fail(reason, inv_freq)
        self.job.found.add((self.rule_name, inv_freq.name))
        return r

    def record(self, inv_freq: ir.Value, position_ids: ir.Value, out: ir.Value, p, seq_len=None) -> Site:
        """The site of (inv_freq, positions, branch), made by its Cos rule or its Sin rule, whichever runs
        first; `out`: the matched output, whose name the replacement value takes over."""
        key = (inv_freq.name, position_ids.name, seq_len)
        site = self.job.site_index.get(key)
        if site is None:
            site = Site(
                rule=self.rule_name,
                inv_freq=inv_freq.name,
                positions=position_ids.name,
                cos="",
                sin="",
                params=site_params(self.job.table_params(p)),
                tables=[],
                seq_len=seq_len,
            )
            self.job.site_index[key] = site
            self.job.sites.append(site)
        setattr(site, self.fn.lower(), out.name)
        return site

    def gather(self, op, p, position_ids: ir.Value, site: Site, seq_len=None, label="") -> ir.Value:
        """The site's (B, S, R) cos or sin: a Gather of its tables, or for a rule whose frequencies
        follow max(position) + 1 (dynamic NTK) the float64 computation in the graph (no tables)."""
        if computed_in_graph(p):
            site.tables = []
            return dynamic_ntk.cos_or_sin(op, self.fn, position_ids, self.job.table_params(p))
        tables = self.job.tables_for(op, p, seq_len, label)
        site.tables = [t.name for t in tables]
        return emit.gather(
            op, tables[0 if self.fn == "Cos" else 1], position_ids, self.job.table_params(p).max_positions
        )


class ConstantFreqRule(CosSinRule):
    """A cos/sin rule of a constant float32 `inv_freq`, with the attention factor's Mul (a `factor` in the
    pattern) or without it; its pattern binds position_ids, axes, inv_freq [, factor]. Subclasses give
    `pattern`, and may override `check_positions` and `freqs_input` (the constant behind an Expand)."""

    @staticmethod
    def freqs_input(inv_freq: ir.Value) -> ir.Value:
        return inv_freq

    def check(self, context, position_ids, axes, inv_freq, factor=None, **_):
        inv_freq = self.freqs_input(inv_freq)
        self._out = context.output_values[0]
        r = self.check_positions(pattern.MatchResult(), position_ids, axes)
        if not r:
            return r
        if factor is None and has_factor_mul(self._out):
            return r.fail(f"cos/sin is multiplied by an attention factor (rule {self.rule_name}_factor)", self._out)
        g = self.constant_freqs(r, inv_freq)
        if g is None:
            return r
        value = 1.0 if factor is None else self.factor_of(r, factor)
        if value is None:
            return r
        self._frozen = frozen_branch(g, self.job.candidates)
        if self._frozen is not None:
            self._p, at, branch = self._frozen
            return self.check_factor(r, inv_freq, self._p, value, at if branch == "short" else at + 1)
        self._p = self.match_params(r, inv_freq, g)
        return r if self._p is None else self.check_factor(r, inv_freq, self._p, value)

    def rewrite(self, op, position_ids, inv_freq, **_):
        inv_freq = self.freqs_input(inv_freq)
        if self._frozen is not None:
            return self.restore_switch(op, position_ids, inv_freq)
        site = self.record(inv_freq, position_ids, self._out, self._p)
        return self.gather(op, self._p, self.read_positions(op, position_ids), site)

    def read_positions(self, op, position_ids: ir.Value) -> ir.Value:
        """The (B, S) int64 positions the Gather reads (a subclass lifts (S,) positions)."""
        return position_ids

    def restore_switch(self, op, position_ids: ir.Value, inv_freq: ir.Value) -> ir.Value:
        """A constant inv_freq that is one branch of a run-time switch (an export that traced
        transformers' `if seq_len > original_max_position_embeddings`): both branches' float64 tables and
        transformers' switch, Where(max(position_ids) + 1 > at, long, short), rebuilt in the graph."""
        p, at, branch = self._frozen
        ids = self.read_positions(op, position_ids)  # (B, S)
        note = f"the export held only the {branch} factors; transformers' switch at {at} restored"
        out = {}
        for name, seq in (("short", at), ("long", at + 1)):
            site = self.record(inv_freq, position_ids, self._out, p, seq)
            site.restored = note
            out[name] = self.gather(op, p, ids, site, seq, f"_{name}")
        seq_len = op.Add(op.ReduceMax(ids, keepdims=0), op.Constant(value_int=1))  # () int64
        cond = op.Greater(seq_len, op.Constant(value_int=at))
        return op.Where(cond, out["long"], out["short"])


def frozen_branch(g: np.ndarray, candidates) -> tuple | None:
    """(params, switch, "short" | "long") when the graph's constant inv_freq is one branch of a rule that
    switches at run time (LongRoPE: short factors up to original_max_position_embeddings, long past it):
    the reference is then the config's switch, never the one branch the graph holds."""
    for p in candidates:
        at = switch_at(p)
        if at is None or computed_in_graph(p):
            continue
        for branch, seq in (("short", at), ("long", at + 1)):
            if params_mod.disagreement(g, p, seq) is None:
                return p, at, branch
    return None


def has_factor_mul(value: ir.Value) -> bool:
    """True when a consumer of `value` multiplies it by a scalar constant (the factor rule's shape)."""
    for use in value.uses():
        user = use.node
        if user.op_type == "Mul":
            other = [v for v in user.inputs if v is not value]
            if (
                other
                and other[0] is not None
                and other[0].const_value is not None
                and other[0].const_value.numpy().size == 1
            ):
                return True
    return False


def site_params(p) -> dict:
    return {
        "head_dim": p.head_dim,
        "rotary_dim": p.rotary_dim,
        "theta": p.theta,
        "pairing": p.pairing,
        "max_positions": p.max_positions,
        "scaling": p.scaling,
        "scaling_params": dict(p.scaling_params),
        "attention_factor": p.attention_factor,
    }


def as_rule(rule: pattern.RewriteRuleClassBase) -> pattern.RewriteRule:
    """The onnxscript RewriteRule of a rule instance (what `RewriteRuleClassBase.rule()` builds from a class)."""
    return pattern.RewriteRule(
        rule.pattern,
        rule.rewrite,
        rule.check,
        name=rule.name,
        remove_nodes=rule.remove_nodes,
        graph_pre_visitor=rule.setup,
        graph_post_visitor=rule.cleanup,
        as_function=rule.as_function,
    )
