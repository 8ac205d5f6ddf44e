"""`pe-export matrix`: export and verify every preset x op target x dtype (see pe_export.matrix)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer


def matrix_command(
    presets: Annotated[Optional[str], typer.Option(help="Presets, comma separated (default: all).")] = None,
    ops: Annotated[Optional[str], typer.Option(help="Op targets, comma separated: onnx, ort, decomposed (default: each preset's).")] = None,
    dtypes: Annotated[Optional[str], typer.Option(help="dtypes, comma separated: fp32, fp16, bf16.")] = None,
    runtimes: Annotated[Optional[str], typer.Option(help="Runtimes, comma separated, as for verify (default: all).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The small CI set: every preset at <= 256 positions in fp32/fp16, and llama-rope at 8192 on every target.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="i/n: run every n-th case starting at the i-th, for CI fleets.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the report: FILE.md (Markdown) or FILE.json.")] = None,
    bundles: Annotated[Optional[Path], typer.Option(help="Folder for reproduction bundles of failed cases (default: matrix-repro here).")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random verification inputs.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
):
    """Export and verify every combination into a temporary folder, then print a summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pe_export import matrix
    from pe_export.cli.common import fail, out, parse_runtimes
    from pe_export.pipeline import free_folder
    from pe_export.onnx_export import check_output_path, write_atomic
    from pe_export.report import render
    from pe_export.parity import DEFAULT_RUNTIMES

    split = lambda text: [v.strip() for v in text.split(",") if v.strip()] if text else None  # noqa: E731
    chosen = parse_runtimes(runtimes) if runtimes is not None else DEFAULT_RUNTIMES
    try:
        todo = matrix.cases(split(presets), split(ops), split(dtypes), quick)
        if shard:
            todo = matrix.shard(todo, *matrix.parse_shard(shard))
        if report is not None:
            check_output_path(report, force)
    except ValueError as e:
        fail(str(e))
    if not todo:
        fail("no case matches these --presets/--ops/--dtypes (an op a preset's encoding does not lower to is left out)")
    bundle_dir = free_folder(bundles or Path("matrix-repro"))
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with tempfile.TemporaryDirectory(prefix="pe-export-matrix-") as tmp, Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task("matrix", total=len(todo))
        for case in todo:
            bar.update(task, description=f"{case.preset} {case.op} {case.dtype}")
            results.append(matrix.run_case(case, Path(tmp), chosen, seed, bundle_dir))
            bar.advance(task)
    table = Table("preset", "op", "dtype", "seq", *chosen, "s")
    for c in results:
        by = {r["runtime"]: r for r in c["rows"]}
        cells = [("FAIL (export)" if c["error"] else "") or _cell(by.get(n)) for n in chosen]
        table.add_row(c["preset"], c["op"], c["dtype"], str(c["seq"]), *cells, f"{c['seconds']:.1f}")
    out.print(table)
    for c in results:
        case = f"{c['preset']} {c['op']} {c['dtype']} seq {c['seq']}"
        for r in c["rows"]:
            if r["verdict"] == "FAIL":
                out.print(f"  {case} {r['runtime']}: {r['note']}", soft_wrap=True)
        if c["error"]:
            out.print(f"  {case} export: {c['error']}", soft_wrap=True)
        if c["bundle"]:
            out.print(f"  reproduction bundle: {c['bundle']}", soft_wrap=True)
        if c["bundle_error"]:
            out.print(f"  {case}: could not write the reproduction bundle: {c['bundle_error']}", soft_wrap=True)
    s = matrix.summary(results)
    out.print(f"{s['cases']} cases, {s['rows']} rows: {s['pass']} pass, {s['FAIL']} FAIL, {s['skipped']} skipped; slowest: {s['slowest']}")
    if s["unverified_cases"]:
        out.print(f"unverified (no runtime here can run them): {', '.join(s['unverified_cases'])}", soft_wrap=True)
    if report is not None:
        doc = {"mode": "quick" if quick else "full", "shard": shard or "", "runtimes": list(chosen), "summary": s, "cases": results}
        try:
            write_atomic(render(doc, report), report, force)
        except ValueError as e:
            fail(str(e))
        out.print(f"wrote {report}")
    if s["failed_cases"]:
        fail(f"{s['failed_cases']} of {s['cases']} cases failed", 1)


def _cell(row) -> str:
    if row is None:
        return ""
    if row["verdict"] == "pass":
        return f"pass {row['worst_ratio']:.2f}"
    return row["verdict"]


app = typer.Typer()
app.command("matrix")(matrix_command)
