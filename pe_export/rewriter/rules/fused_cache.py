"""What the rules for fused RoPE nodes share: the (P, R/2) cos/sin caches such a node reads, their
agreement with the config, and the site that replaces them by float64-built tables.

A fused node (`RotaryEmbedding` of either domain, `com.microsoft::GroupQueryAttention` with do_rotary)
reads its cos and sin caches in one of these forms:

    a float32, float16 or bfloat16 constant (P, R/2) (onnxruntime-genai's model builder in the model's io
    dtype, ORT's transformers optimizer):
        cos[p, m] = F * cos(fl(p * inv_freq[m])), angles in float32 as torch computed them, then rounded
    onnxscript's `CosSinCacheFusion` with a run-time length (no max_pos_id given):
        Range(0, ReduceMax(position_ids) + 1, 1) -> Reshape(-1, 1) -> Cast(FLOAT)
        -> MatMul(., inv_freq (1, R/2)) -> Cos, Sin                                    (P, R/2)
    LongRoPE's long and short constant pairs, chosen by an If or concatenated (onnxruntime-genai's
    Phi-3; `longrope_switch`), each branch checked for calls on its side of the switch

A constant cache agrees with the config when it is the config's table with float32 angles (pe-export's
`angles="float32"`, transformers' arithmetic) to within `TABLE_ULPS` of cos/sin rounding (plus half the
eps of a narrower dtype) plus, on each angle, the `params.ULPS` a float32 inv_freq may be off (other
float32 arithmetic for the same frequencies): a wrong theta moves the angles at the table's end by far
more. A disagreement is named by
the parameter that explains it, read off the table (rotary dim from its width, the attention factor
from row 0, inv_freq from the rows' angles). A computed cache's inv_freq constant is checked as the
cos/sin rules check theirs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from pe_export.dtypes import EPS
from pe_export.encodings.rope import tables
from pe_export.rewriter import params as params_mod
from pe_export.rewriter.job import Site
from pe_export.rewriter.rules.base import site_params
from pe_export.rewriter.rules.longrope_switch import (
    BRANCHES,
    NOT_SHIFTED,
    Switch,
    branch_sites,
    concatenated,
    position_shift,
    rebuild,
    switch_refusal,
    switched,
)
from pe_export.rewriter.rules.rotate_half import _ints

TABLE_ULPS = (
    4  # float32 cos/sin of a float32 angle (torch, NumPy, ORT) against the same angle's cos/sin in float64, rounded
)
EPS32 = 2.0**-24
TABLE_PREFIX = "pe_export.rope."  # the names `Job.tables_for` gives
# The caches' dtypes: onnxruntime-genai writes them in the model's io dtype (fp16 for its CUDA, WebGPU and
# DML models), computed in float32 and rounded once.
CACHE_DTYPES = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}


def computed_inv_freq(cache: ir.Value) -> ir.Value | None:
    """The inv_freq constant behind onnxscript's in-graph cache
    Cos|Sin(MatMul(Cast(Reshape(Range(0, n, 1))), inv_freq)), or None."""
    trig = cache.producer()
    if trig is None or trig.op_type not in ("Cos", "Sin"):
        return None
    matmul = trig.inputs[0].producer()
    if matmul is None or matmul.op_type != "MatMul":
        return None
    positions, freqs = matmul.inputs
    if freqs.const_value is None and freqs.producer() is not None and freqs.producer().op_type == "Reshape":
        freqs = freqs.producer().inputs[0]  # Reshape(inv_freq, (1, -1)) before constant folding
    v = positions
    for op_type in ("Cast", "Reshape", "Range"):
        node = v.producer()
        if node is None or node.op_type != op_type:
            return None
        if op_type == "Range" and (_ints(node.inputs[0]) != [0] or _ints(node.inputs[2]) != [1]):
            return None
        v = node.inputs[0]
    return freqs if freqs.const_value is not None else None


def table_inv_freq(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The (R/2,) frequencies behind a (P, R/2) cos/sin table, read off the angles of rows 1, 1000, 10^6
    .. and the last row (each row's estimate unwraps the next one's angle; the last row's is the most
    precise: atan2's error over the row)."""
    angle = lambda r: np.arctan2(sin[r].astype(np.float64), cos[r].astype(np.float64))  # noqa: E731  in (-pi, pi]
    rows = cos.shape[0]
    g = angle(1) if rows > 1 else np.zeros(cos.shape[1])
    r = 1
    while r < rows - 1:
        r = min(r * 1000, rows - 1)
        turns = np.round((r * g - angle(r)) / (2 * np.pi))
        g = (angle(r) + 2 * np.pi * turns) / r
    return g


def table_disagreement(
    cos: np.ndarray, sin: np.ndarray, p, seq_len: int | None = None, dtype: str = "fp32"
) -> str | None:
    """None when the (P, R/2) tables are the config's (see the module docstring) for calls of `seq_len`
    (a LongRoPE branch; None: the rule's only or short one), else the parameter that disagrees; `dtype`:
    the caches' (fp16 and bf16 add their rounding of the float32 values)."""
    rounding = 0.0 if dtype == "fp32" else EPS[dtype] / 2
    rows, half = cos.shape
    if 2 * half != p.rotary_dim:
        return (
            f"rotary dim: the graph's cos/sin cache is {half} wide (rotary dim {2 * half}), the config gives "
            f"rotary dim {p.rotary_dim}"
        )
    reason = params_mod.factor_disagreement(float(np.hypot(cos[0, 0], sin[0, 0])), p, seq_len, 2 * rounding)
    if reason:
        return reason
    p32 = replace(p, max_positions=rows, angles="float32")
    want_cos, want_sin = tables(p32, seq_len)  # (P, R/2) float64 of float32 angles, attention factor included
    freqs = params_mod.float32_inv_freq(p32, seq_len).astype(np.float64)
    factor = params_mod.attention_factor(p32, seq_len)
    bound = factor * (TABLE_ULPS * EPS32 + rounding + params_mod.REL * np.arange(rows)[:, None] * freqs)  # (P, R/2)
    err = np.maximum(np.abs(cos - want_cos), np.abs(sin - want_sin))
    if np.all(err <= bound):
        return None
    # Name the parameter: the frequencies the table's angles give, as the cos/sin rules name theirs.
    reason = params_mod.disagreement(table_inv_freq(cos, sin), p, seq_len)
    if reason is None:  # the frequencies agree, the table does not (rows that are not cos/sin of them)
        r, m = np.unravel_index(np.argmax(err - bound), err.shape)
        reason = (
            f"theta: the graph's cos/sin cache differs from the config's (theta {p.theta:g}, rotary dim "
            f"{p.rotary_dim}, "
            f"rope_type {p.scaling!r}) by {err[r, m]:.2e} at row {r}"
        )
    return reason


class FusedCacheRule(pattern.RewriteRuleClassBase):
    """A fused node reading (cos_cache, sin_cache): subclasses give `pattern` (binding `cos_cache` and
    `sin_cache`) and `rebuild(op, new_cos, new_sin, **bindings)`, the same node on the new tables; the
    site records the node type (`fused`)."""

    order = 1
    kind = "cos_sin"
    functions = (None,)
    fused = ""

    def __init__(self, job, fn=None):
        super().__init__(self.rule_name if fn is None else f"{self.rule_name}.{fn}")
        self.job = job
        self._p = None
        self._matched = {}  # (cos name, sin name) -> match_pair's answer
        self._switches = {}  # (cos name, sin name) -> the Switch of caches an If chooses
        self._dtypes = {}  # (cos name, sin name) -> the constant caches' dtype ("fp32", "fp16", "bf16")
        self._dtype = "fp32"

    def check_caches(
        self,
        r: pattern.MatchResult,
        cos_cache: ir.Value,
        sin_cache: ir.Value,
        interleaved: int = 0,
        rotary_dim: int = 0,
        positions: ir.Value | None = None,
    ) -> pattern.MatchResult:
        """The caches are a constant or computed pair that agrees with one of the config's parameter sets,
        and the node's own rotation attributes (`interleaved`, `rotary_embedding_dim`, 0: the cache's
        width) and `positions` (None: the node has none) with it (else the refusal naming the parameter);
        sets `self._p`."""
        if (cos_cache.name or "").startswith(TABLE_PREFIX):
            return r.fail("the caches are already pe-export's tables (this rule's own replacement)", cos_cache)
        key = (cos_cache.name, sin_cache.name)
        if key not in self._matched:  # one check per cache pair: every layer's node reads the same caches
            self._matched[key] = self.match_pair(cos_cache, sin_cache)
        p, reason, where, unrecognised = self._matched[key]
        if unrecognised:
            return r.fail(unrecognised, cos_cache)
        switch = self._switches.get(key)
        if not reason and switch is not None and switch.node is None:  # one concatenated cache
            shift, original = position_shift(positions), p.scaling_params["original_max_positions"]
            if shift is None:
                return r.fail(NOT_SHIFTED, cos_cache)  # not genai's form: no site
            if shift != (original, original):
                reason = (
                    f"original_max_position_embeddings: the graph moves positions by {shift[0]} into the long rows "
                    f"of its concatenated cos/sin cache when max(position) >= {shift[1]}, the config gives {original}"
                )
        if not reason and (p.pairing == "interleaved") != bool(interleaved):
            reason = (
                f"pairing: the graph's {self.fused} rotates {'interleaved pairs' if interleaved else 'halves'} "
                f"(interleaved={interleaved}), the config's pairing is {p.pairing!r}"
            )
        if not reason and rotary_dim and rotary_dim != p.rotary_dim:
            reason = (
                f"rotary dim: the graph's {self.fused} has rotary_embedding_dim {rotary_dim}, the config gives "
                f"rotary dim {p.rotary_dim}"
            )
        if reason:
            self.job.refuse(f"{reason} (site {where!r}, read by {self.fused})")
            return r.fail(reason, cos_cache)
        self._p, self._dtype = p, self._dtypes.get(key, "fp32")
        self.job.found.add((self.rule_name, where))
        return r

    def match_pair(self, cos_cache: ir.Value, sin_cache: ir.Value):
        """(parameter set or None, refusal reason, the site's name, why the pair is no cache form recognised
        here ("" when it is one))."""
        switch = switched(cos_cache, sin_cache, CACHE_DTYPES)
        if isinstance(switch, str):
            return None, "", "", switch
        if switch is not None:
            self._switches[(cos_cache.name, sin_cache.name)] = switch
            self._dtypes[(cos_cache.name, sin_cache.name)] = switch.dtype
            return self.match_switch(switch)
        computed = computed_inv_freq(cos_cache), computed_inv_freq(sin_cache)
        if computed[0] is not None and computed[0] is computed[1]:
            g = computed[0].const_value.numpy()
            if g.dtype != np.float32 or sum(d > 1 for d in g.shape) > 1:
                return None, "", "", f"inv_freq is {g.dtype} of shape {g.shape}, not float32 (R/2,)"
            p, reason = params_mod.match(g.reshape(-1), self.job.candidates)
            reason = reason or (params_mod.factor_disagreement(1.0, p) if p is not None else "")
            return p, reason, computed[0].name, ""
        values = [c.const_value for c in (cos_cache, sin_cache)]
        if (
            any(v is None or v.dtype not in CACHE_DTYPES or len(v.shape) != 2 for v in values)
            or values[0].shape != values[1].shape
            or values[0].dtype != values[1].dtype
        ):
            return (
                None,
                "",
                "",
                "the cos/sin caches are neither float32, float16 or bfloat16 (P, R/2) constants nor computed from "
                "a Range of positions",
            )
        key = (cos_cache.name, sin_cache.name)
        dtype = self._dtypes[key] = CACHE_DTYPES[values[0].dtype]
        cos, sin = (v.numpy().astype(np.float64) for v in values)
        reasons = [table_disagreement(cos, sin, p, dtype=dtype) for p in self.job.candidates]
        p = next((c for c, why in zip(self.job.candidates, reasons) if why is None), None)
        if p is not None:
            return p, "", cos_cache.name, ""
        for c in self.job.candidates:  # onnxruntime-genai's LongRoPE for EPs without If: [short rows; long rows]
            original = c.scaling_params.get("original_max_positions", 0) if c.scaling == "longrope" else 0
            if 0 < original < cos.shape[0]:
                switch = concatenated(key, cos, sin, original, dtype)
                found = self.match_switch(switch)
                if found[0] is not None:
                    self._switches[key] = switch
                    return found
                if cos.shape[0] == original + c.max_positions:  # the layout's length: its reason is the one
                    reasons = [f"{found[1]} (a cache of {original} short rows then {c.max_positions} long ones)"]
        return None, "; ".join(dict.fromkeys(reasons)), cos_cache.name, ""

    def match_switch(self, switch: Switch):
        """match_pair for an If choosing between LongRoPE's long (then) and short (else) cache pairs: the
        config's switch and each branch's table for calls on its side of it (see `longrope_switch`)."""
        where, reasons = switch.names["then_branch"][0], []
        for p in self.job.candidates:
            if p.scaling != "longrope":
                reasons.append(
                    f"scaling: the graph switches between two cos/sin caches at run time (LongRoPE), the config "
                    f"gives rope_type {p.scaling!r}"
                )
                continue
            original = p.scaling_params["original_max_positions"]
            reason = switch_refusal(switch, original)
            for branch, seq_len, kind in zip(BRANCHES, (original + 1, original), ("long", "short")):
                why = None if reason else table_disagreement(*switch.values[branch], p, seq_len, switch.dtype)
                reason = reason or (why and f"{why} (the {kind} factors' caches {switch.names[branch][0]!r})")
            if reason is None:
                return p, "", where, ""
            reasons.append(reason)
        return None, "; ".join(dict.fromkeys(reasons)), where, ""

    def new_caches(
        self, op, cos_cache: ir.Value, sin_cache: ir.Value, positions: str = ""
    ) -> tuple[ir.Value, ir.Value, Site]:
        """The float64-built (P, R/2) tables of --seq rows for this cache pair, and its site (one per pair;
        caches an If chooses: the same If on new tables, and the long branch's site)."""
        p = self._p
        key = (cos_cache.name, sin_cache.name)
        if key in self._switches:
            return self.new_switched_caches(op, key, positions)
        tables_ = self.job.tables_for(op, p, dtype=self._dtype)
        key = (cos_cache.name, sin_cache.name, None)
        site = self.job.site_index.get(key)
        if site is None:
            replaced = computed_inv_freq(cos_cache)
            site = Site(
                rule=self.rule_name,
                inv_freq=(replaced or cos_cache).name,
                positions=positions,
                cos=cos_cache.name,
                sin=sin_cache.name,
                params=site_params(self.job.table_params(p)),
                tables=[t.name for t in tables_],
                width="table",
                fused=self.fused,
                replaced=[] if replaced is not None else [sin_cache.name],
                dtype=self._dtype,
            )
            self.job.site_index[key] = site
            self.job.sites.append(site)
        return (*tables_, site)

    def new_switched_caches(self, op, key: tuple[str, str], positions: str) -> tuple[ir.Value, ir.Value, Site]:
        """LongRoPE's two cache pairs (an If's, or one concatenated pair) rebuilt on float64-built tables
        (`longrope_switch`), once for every node reading them; the long branch's site."""
        if key not in self.job.built:
            switch = self._switches[key]
            pairs, sites = branch_sites(self, op, switch, self._p, positions)
            cos_v, sin_v = rebuild(op, switch, pairs, f"pe_export.rope.switch_{len(self.job.built)}")
            self.job.built[key] = (cos_v, sin_v, sites[0])
        return self.job.built[key]
