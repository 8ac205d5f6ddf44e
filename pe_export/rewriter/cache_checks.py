"""Verification of the sites a fused node reads (`Site.width == "table"`): the (P, R/2) cos/sin caches
themselves, not per-position values, so the rest of the model (attention with its past key/values) is
not run. The original's caches are read back (a constant) or computed by ORT from a copy of the graph
pruned to them, fed positions reaching the table's last row (onnxscript's run-time cache); the
rewritten's are its constant tables. Rows at positions spread over the table, the last ones included,
against pe-export's float64 reference; the original's rows past its own length are NaN. Same rows and
bound as `verify.check_sites` (which leaves these sites to this module).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pe_export.dtypes import EPS
from pe_export.encodings.rope import RopeParams, inv_freq, tables
from pe_export.errors import one_line
from pe_export.rewriter.checks import DEFAULT_RUNTIMES, SiteRow, fed, feeds, run_all, site_positions
from pe_export.rewriter.copies import Copies
from pe_export.rewriter.job import Site
from pe_export.rewriter.rules.longrope_switch import constant as switch_constant
from pe_export.runtimes.outcomes import verdict_of
from pe_export.verification.tolerances import tolerance


def constants(model: ir.Model, names) -> dict[str, np.ndarray]:
    """The named values of `model` that are constants: initializers and Constant nodes' outputs, in the
    main graph and its subgraphs (the caches an If chooses, `rules.longrope_switch`)."""
    names, out = set(names), {}
    for graph in model.graphs():
        for v in (*graph.initializers.values(), *(o for n in graph for o in n.outputs)):
            if v.name in names and v.name not in out and (t := switch_constant(v)) is not None:
                out[v.name] = t.numpy()
    return out


def cache_values(
    model: ir.Model, names: list[str], positions: np.ndarray, runtime: str, timeout: float | None = None
) -> tuple[str, list[np.ndarray]]:
    """(provider, the named (P, R/2) values of `model`): constants read back ("constant"), computed ones
    run by `runtime` in its worker on a copy pruned to them (its remaining inputs fed from `positions`)."""
    consts = constants(model, names)
    computed = [n for n in names if n not in consts]
    provider = "constant"
    if computed:
        with Copies(model) as copies:  # bytes, or by path for a large model
            copy = copies.with_outputs(model, computed, only=True)
            provider, (got,) = run_all(runtime, copy.model, computed, fed([feeds(model, positions)], copy), timeout)
        consts.update(got)
    return provider, [consts[n] for n in names]


def rows_at(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(S, R/2) rows of `table` at `positions`, NaN past its end."""
    out = np.full((positions.size, table.shape[-1]), np.nan)
    inside = positions < table.shape[0]
    out[inside] = table[positions[inside]]
    return out


def check_caches(
    original: ir.Model, rewritten: ir.Model, sites: list[Site], runtimes=DEFAULT_RUNTIMES, timeout: float | None = None
) -> list[SiteRow]:
    """A cache row per fused site and runtime; a runtime that cannot compute the original's cache is a
    row with its verdict and reason."""
    rows = []
    for runtime in runtimes:
        for i, site in enumerate(sites):
            if site.width != "table":
                continue
            p = RopeParams(**site.params)
            positions = site_positions(site)  # a LongRoPE branch's: the positions it serves
            ref_cos, ref_sin = (t[positions] for t in tables(p, site.seq_len))  # (S, R/2) float64
            unit = EPS[site.dtype] / 2  # the tables' rounding: float32 or the graph's fp16/bf16 caches
            bound = tolerance(site.dtype, "decomposed").factor * unit * max(1.0, inv_freq(p, site.seq_len)[1])
            errs, providers = {}, []
            try:
                for kind, model, names in (
                    ("original", original, [site.cos, site.sin]),
                    ("rewritten", rewritten, site.tables),
                ):
                    provider, values = cache_values(model, names, positions, runtime, timeout)
                    skip = site.offset if kind == "original" else 0  # a branch's rows in a concatenated cache
                    cos, sin = (rows_at(t[skip:], positions) for t in values)
                    errs[kind] = np.maximum(np.abs(cos - ref_cos).max(-1), np.abs(sin - ref_sin).max(-1))
                    providers.append(provider)
            except Exception as e:  # every failure of a runtime is a row
                rows.append(
                    SiteRow(i, runtime, positions.tolist(), [], [], bound, verdict_of(e), "", one_line(e), "caches")
                )
                continue
            verdict = "pass" if float(errs["rewritten"].max()) <= bound else "FAIL"
            rows.append(
                SiteRow(
                    i,
                    runtime,
                    positions.tolist(),
                    errs["original"].tolist(),
                    errs["rewritten"].tolist(),
                    bound,
                    verdict,
                    " / ".join(dict.fromkeys(providers)),
                    "",
                    "caches",
                )
            )
    return rows
