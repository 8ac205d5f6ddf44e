"""`pe-export rewrite` as one library call: load, rewrite, check every site and the whole model on each
runtime in its worker, then write the model (and the report). The CLI only parses and prints.

    rewrite_and_verify(model, config, seq=None, op="tables", output=None, force=False,
                       runtimes=DEFAULT_RUNTIMES, report=None) -> RewriteRun
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pe_export.errors import BadInput
from pe_export.files import check_output_path, write_atomic
from pe_export.rewriter import DEFAULT_RUNTIMES, RUNTIMES, apply, cache_checks, checks, copies
from pe_export.rewriter.core import Rewritten
from pe_export.rewriter.output import Output
from pe_export.rewriter.rewrite_report import document, render
from pe_export.runtimes import GRAPH_RUNTIMES, check_names, worker


@dataclass
class RewriteRun:
    """A verified rewrite: the result, its rows, and where it was written."""

    result: Rewritten
    output: Path
    runtimes: tuple[str, ...]
    site_rows: list = field(default_factory=list)  # checks.SiteRow, cache rows included, by site
    whole_rows: list = field(default_factory=list)  # checks.WholeRow, one per runtime
    report: Path | None = None

    @property
    def verdict(self) -> str:
        """'pass'; 'FAIL' when a row failed; 'unverified' when no runtime checked any site."""
        if checks.failed([*self.site_rows, *self.whole_rows]):
            return "FAIL" if any(r.verdict == "pass" for r in self.site_rows) else "unverified"
        return "pass"


def rewrite_and_verify(
    model: Path | str,
    config,
    seq: int | None = None,
    op: str = "tables",
    output: Path | str | None = None,
    force: bool = False,
    runtimes=DEFAULT_RUNTIMES,
    report: Path | str | None = None,
) -> RewriteRun:
    """Rewrite the RoPE of the model file `model` with `config`'s parameters, verify it on `runtimes`
    against the config's float64 semantics, and write it to `output` (default MODEL.pe.onnx beside it)
    and the report to `report` (.md or .json). Bad input raises BadInput before anything is written;
    the model is written whatever the verdict (read `RewriteRun.verdict`)."""
    model = Path(model)
    chosen = check_names(runtimes, RUNTIMES)
    output = Path(output) if output is not None else model.with_name(f"{model.stem}.pe.onnx")
    report = Path(report) if report is not None else None
    check_output_path(output, force)
    if report is not None:
        check_output_path(report, force)
    original = apply.load(model)
    if copies.is_large(original):  # written with a side file: refuse an existing one now, not after the checks
        check_output_path(output.with_name(f"{output.name}.data"), force)
    if config is None:
        raise BadInput(f"rewrite needs --config CONFIG.json (the model's config.json); {apply.describe(original)}")
    worker.start(chosen, GRAPH_RUNTIMES)  # the runtimes' interpreters start while the rewrite runs
    # A large model's external data is copied to the output while the rewrite and its checks run, and
    # handed to the disk as it goes: the checks' sessions allocate gigabytes, which dirty pages slow.
    with Output(output, force, original, flush=True) as out:
        result = apply.rewrite(original, config, seq, op)  # `original` itself is left unchanged
        apply.prune(result.model)  # verify what is written
        site_rows = checks.check_sites(original, result.model, result.sites, chosen)
        site_rows += cache_checks.check_caches(original, result.model, result.sites, chosen)
        whole_rows = checks.check_whole(original, result.model, chosen, cache_dims=checks.cache_dims_of(config))
        run = RewriteRun(result, output, chosen, sorted(site_rows, key=lambda r: r.site), whole_rows, report)
        apply.save(result.model, output, force, out)
    if report is not None:
        write_atomic(render(document(result.spec, run.site_rows, whole_rows), report), report, force)
    return run
