"""`pe-export verify FILE`, and the printing of a verification that every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pe_export.cli.common import fail, out, parse_runtimes
from pe_export.runtimes import DEFAULT_RUNTIMES, RUNTIMES

app = typer.Typer()
PROVIDERS = {"cpu": "ort-cpu", "cuda": "ort-cuda"}  # the old --providers names


@app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="An ONNX file written by pe-export.")],
    runtimes: Annotated[
        str | None,
        typer.Option(
            help=f"Runtimes to check, comma separated: {', '.join(RUNTIMES)} (default: "
            f"{', '.join(DEFAULT_RUNTIMES)}; absent ones are reported as skipped)."
        ),
    ] = None,
    providers: Annotated[
        str | None,
        typer.Option(
            help="Old form of --runtimes: ONNX Runtime providers cpu, cuda (torch and onnx-reference run too)."
        ),
    ] = None,
    positions: Annotated[
        str | None,
        typer.Option(
            help="Also probe exactly these positions: integers and ranges a:b, comma separated (e.g. 0,131000:131072)."
        ),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, max=64, help="Batch size of the probes.")] = 2,
    probe_bounds: Annotated[
        bool,
        typer.Option(
            "--probe-bounds",
            help="Also feed positions -1 and the table length, and report runtimes that do not fail on them.",
        ),
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="Also write the report: FILE.json, or FILE.md for Markdown.")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="On failure, write the reproduction bundle here (default: FILE.repro beside the model)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random verification inputs.")] = 0,
    weights: Annotated[
        Path | None, typer.Option(help="Where the learned weights file the model was exported from is now.")
    ] = None,
):
    """Re-verify a file pe-export wrote against the float64 reference rebuilt from its embedded spec:
    positions over the whole table (its last rows always), a decode step and batch > 1, on every runtime."""
    if runtimes is not None and providers is not None:
        fail("give --runtimes or --providers, not both")
    if providers is not None:
        names = [p.strip() for p in providers.split(",") if p.strip()]
        if not names or any(p not in PROVIDERS for p in names):
            fail(f"--providers takes a comma-separated list of {', '.join(PROVIDERS)}, got {providers!r}")
        chosen = ("torch", *[PROVIDERS[p] for p in names], "onnx-reference")
    else:
        chosen = parse_runtimes(runtimes) if runtimes is not None else None
    finish(
        file,
        chosen,
        report,
        force,
        seed,
        batch=batch,
        positions=positions,
        probe_bounds=probe_bounds,
        bundle=bundle,
        weights=weights,
    )


def print_rows(rows, bounds_rows=None):
    from pe_export.verification.report import ROW_COLUMNS, row_cells

    table = Table(*ROW_COLUMNS)
    for r in rows:
        table.add_row(*row_cells(r.as_dict()))
    out.print(table)
    for r in rows:
        if r.note:
            out.print(f"  {r.runtime} {r.verdict}: {r.note}", soft_wrap=True)
    for b in bounds_rows or []:
        out.print(
            f"  out-of-range positions, {b.runtime}: {b.verdict}{': ' + b.note if b.note else ''}", soft_wrap=True
        )


def finish(path, runtimes, report, force, seed, **options):
    """Verify, print the table, say where the report and the bundle went, exit 0 / 1."""
    from pe_export.pipeline import artifact as pipeline

    try:
        with out.status("verifying"):
            result = pipeline.verify(path, runtimes, report=report, force=force, seed=seed, **options)
    except ValueError as e:
        fail(str(e))
    print_rows(result.rows, result.bounds)
    if result.report:
        out.print(f"wrote {result.report}")
    if result.bundle:
        out.print(f"wrote the reproduction bundle {result.bundle} (README.txt has the command that re-runs the check)")
    if result.bundle_error:
        out.print(result.bundle_error)
    exit_on(result)
    if result.silent:
        out.print(
            f"[yellow]warning[/yellow]: {', '.join(result.silent)} returned results for positions outside the table: "
            f"guard positions before calling it"
        )
    if result.aborts:
        out.print(
            f"[yellow]warning[/yellow]: {', '.join(result.aborts)} aborted the process (or hung) on positions "
            f"outside the table: guard positions before calling it"
        )
    out.print(f"[green]verified[/green]: {path} matches the float64 reference on every runtime that ran")


def exit_on(result, failed: str | None = None):
    """Exit 1 unless the verification passed."""
    if result.verdict == "FAIL":
        fail(failed or f"parity check failed; {result.path} is kept for inspection", 1)
    if result.verdict == "unverified":
        fail(
            f"no runtime here could run {result.path} ({result.spec.op}, {result.spec.dtype}); it is kept but "
            f"unverified",
            1,
        )
