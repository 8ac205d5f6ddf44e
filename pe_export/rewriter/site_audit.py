"""`pe-export audit`: the rewrite's dry pass and its per-site check, run on the ORIGINAL model; nothing written.

    audit(model, config, seq=None, runtimes=DEFAULT_RUNTIMES, report=None, force=False) -> Audit

Each site the rewrite recognises (or, for a file `pe-export rewrite` wrote, each site its metadata lists)
has its cos/sin, or the (P, R/2) caches a fused node reads, checked against pe-export's float64
reference (`pe_export.encodings.rope.tables`) at positions spread to the end of the context (`seq`, else
the config's max_position_embeddings), on each runtime in its worker (`checks.check_sites`,
`cache_checks.check_caches`). A site passes when its error is within the tolerance table's fp32 bound
(the bound `pe-export rewrite` holds its output to) at every checked position. A table or cache shorter
than the context is named: positions past a cache are silently not rotated on ORT CUDA and WebGPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from pe_export.errors import BadInput
from pe_export.files import check_output_path, write_atomic
from pe_export.rewriter import DEFAULT_RUNTIMES, RUNTIMES, apply, cache_checks, checks
from pe_export.rewriter.core import METADATA_KEY, rewrite_model
from pe_export.rewriter.job import Site
from pe_export.runtimes import check_names


@dataclass
class SiteAudit:
    """One site's verdict over every runtime that ran it."""

    site: int
    rule: str
    what: str  # "cos/sin", "caches" or "rotated q/k"
    rows: int  # the positions its table or cache serves (None-free: the context when computed in the graph)
    context: int  # the positions the config (or --seq) asks for
    worst_error: float | None  # over runtimes and positions; None when no runtime ran it
    worst_position: int | None
    bound: float
    verdict: str  # pass, FAIL, or a runtime's failure (CRASH, TIMEOUT, unsupported) when none ran it
    note: str = ""
    change: str = ""  # what `pe-export rewrite` would change at this site

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Audit:
    model: Path
    rewritten: bool  # the file is one `pe-export rewrite` wrote (its sites read from its metadata)
    sites: list[SiteAudit] = field(default_factory=list)
    rows: list = field(default_factory=list)  # checks.SiteRow of the audited model (its error: original_error)
    frozen: list[str] = field(default_factory=list)  # LongRoPE branches the graph lacks
    report: Path | None = None

    @property
    def verdict(self) -> str:
        """'pass' when every site is within its bound at every checked position, else 'FAIL'."""
        return "pass" if self.sites and all(s.verdict == "pass" for s in self.sites) else "FAIL"

    def to_dict(self) -> dict:
        return {
            "audit": {"model": str(self.model), "rewritten": self.rewritten, "verdict": self.verdict},
            "sites": [s.to_dict() for s in self.sites],
            "frozen": self.frozen,
            "rows": [r.to_dict() for r in self.rows],
        }


def check_external_data(model: ir.Model) -> None:
    """BadInput naming the first initializer whose external data file is missing or shorter than it needs."""
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if not isinstance(t, ir.ExternalTensor):
            continue
        path = Path(t.base_dir) / t.location
        need = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
        have = path.stat().st_size if path.is_file() else None
        if have is None:
            raise BadInput(f"external data {t.location!r} of initializer {name!r} does not exist beside the model")
        if have < need:
            raise BadInput(
                f"external data {t.location!r} is truncated: initializer {name!r} needs bytes up to {need}, "
                f"the file has {have}"
            )


def _sites_of(model: ir.Model, config, seq: int | None) -> tuple[list[Site], ir.Model, bool]:
    """(sites, the rewritten model to compare with, whether the audited file is already rewritten)."""
    if METADATA_KEY in model.metadata_props:
        spec = json.loads(model.metadata_props[METADATA_KEY])
        sites = [Site(**s) for s in spec.get("sites", [])]
        # A fused node of a rewritten file reads the tables (the original caches are gone).
        sites = [replace(s, cos=s.tables[0], sin=s.tables[1]) if s.width == "table" else s for s in sites]
        return sites, model, True
    result = rewrite_model(model, config, seq, "tables")
    apply.prune(result.model)
    return result.sites, result.model, False


def _rows_served(model: ir.Model, site: Site, context: int) -> int:
    """The positions the audited model's table or cache of `site` holds (its first axis); the context when
    the site computes cos/sin from positions (no table to run out of)."""
    names = (site.cos, site.sin, site.inv_freq, *site.replaced)
    for value in cache_checks.constants(model, names).values():  # an If's caches are in its branches
        if (value.ndim == 2 and site.width == "table") or site.rule.startswith("sincos_table"):
            rows = int(value.shape[0]) - site.offset  # a LongRoPE branch's rows in a concatenated cache
            return rows if site.seq_len is None else min(rows, checks.site_span(site)[1])  # the rows it serves
    return context


def _change(site: Site, rewritten: bool) -> str:
    if rewritten:
        return "none: already rewritten"
    p = site.params
    what = f"caches {site.cos!r}/{site.sin!r} read by {site.fused}" if site.fused else f"cos/sin of {site.inv_freq!r}"
    rows = checks.site_span(site)[1] if site.width == "table" else p["max_positions"]  # a short branch's caches
    return f"{what} -> float64-built ({rows}, {p['rotary_dim'] // 2}) tables"


def _frozen(sites: list[Site]) -> list[str]:
    """A LongRoPE config whose graph holds one branch only (every LongRoPE site of one seq_len): the
    exporter froze the short/long switch at trace time. A graph that keeps the switch has sites of both."""
    longrope = [s for s in sites if s.params["scaling"] == "longrope"]
    if not longrope or len({s.seq_len for s in longrope}) > 1:
        return []
    names = ", ".join(repr(s.inv_freq) for s in longrope)
    return [
        f"{names}: one LongRoPE branch only (the exporter froze the short/long switch at trace time); "
        "positions past original_max_position_embeddings use the same factors"
    ]


def audit(
    model: Path | str,
    config,
    seq: int | None = None,
    runtimes=DEFAULT_RUNTIMES,
    report: Path | str | None = None,
    force: bool = False,
) -> Audit:
    """Check every RoPE site of the model file `model` against `config`'s float64 semantics at positions
    spread to the end of the context, on `runtimes`; write nothing but the report (.md or .json) if asked.
    Raises BadInput for a missing or unreadable model, truncated external data, a config that disagrees
    with the graph, or a graph with no site."""
    model = Path(model)
    chosen = check_names(runtimes, RUNTIMES)
    report = Path(report) if report is not None else None
    if report is not None:
        check_output_path(report, force)
    original = apply.load(model)
    check_external_data(original)
    if config is None:
        raise BadInput(f"audit needs --config CONFIG.json (the model's config.json); {apply.describe(original)}")
    sites, other, rewritten = _sites_of(original, config, seq)
    rows = checks.check_sites(original, other, sites, chosen)
    rows += cache_checks.check_caches(original, other, sites, chosen)
    result = Audit(model, rewritten, rows=sorted(rows, key=lambda r: r.site), frozen=_frozen(sites), report=report)
    for i, site in enumerate(sites):
        context = checks.site_span(site)[1]  # a LongRoPE branch's short caches serve up to the switch
        served = _rows_served(original, site, context)
        for what in dict.fromkeys(r.what for r in rows if r.site == i):
            mine = [r for r in rows if r.site == i and r.what == what]
            result.sites.append(_judge(i, site, what, mine, served, context, rewritten))
    if report is not None:
        write_atomic(render(result, report), report, force)
    return result


def _judge(i: int, site: Site, what: str, rows: list, served: int, context: int, rewritten: bool) -> SiteAudit:
    """The site's verdict: the audited model's error (`original_error` of each row) against the row's bound."""
    worst, at, bound, notes, ran = None, None, rows[0].bound if rows else 0.0, [], False
    for r in rows:
        errors = [(e, p) for e, p in zip(r.original_error, r.positions)]
        if not errors or all(e is None for e, _ in errors):
            notes.append(f"{r.runtime}: {r.verdict}{f': {r.note}' if r.note else ''}")
            continue
        ran = True
        bound = r.bound
        for e, p in errors:
            e = math.inf if e is None or math.isnan(e) else e
            if worst is None or e > worst:
                worst, at = e, p
    if served < context:
        notes.insert(
            0,
            f"its table holds {served} positions, the context {context}: positions {served}-{context - 1} "
            "are not rotated correctly (silently not rotated on ORT CUDA and WebGPU)",
        )
    if not ran:
        verdict = rows[0].verdict if rows else "unsupported"
    else:
        verdict = "pass" if worst <= bound and served >= context else "FAIL"
    return SiteAudit(
        i,
        site.rule,
        what,
        served,
        context,
        None if worst is None or math.isinf(worst) else worst,
        at,
        bound,
        verdict,
        "; ".join(notes),
        _change(site, rewritten),
    )


def markdown(result: Audit) -> str:
    lines = [
        f"# pe-export audit of {result.model.name}: {result.verdict}",
        "",
        "| site | rule | checked | rows | context | worst error | at position | bound | verdict "
        "| rewrite would change |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result.sites:
        err = "-" if s.worst_error is None else f"{s.worst_error:.2e}"
        verdict = s.verdict + (f": {s.note}" if s.note else "")
        lines.append(
            f"| {s.site} | {s.rule} | {s.what} | {s.rows} | {s.context} | {err} | {s.worst_position} | "
            f"{s.bound:.2e} | {verdict} | {s.change} |"
        )
    lines += ["", *(f"- frozen: {f}" for f in result.frozen)]
    return "\n".join(lines) + "\n"


def render(result: Audit, path: Path) -> bytes:
    return (markdown(result) if path.suffix.lower() == ".md" else json.dumps(result.to_dict(), indent=2)).encode()
