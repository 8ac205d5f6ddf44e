"""`pe-export matrix`: export and verify every preset x op target x dtype (see pe_export.tools.matrix)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer


def matrix_command(
    presets: Annotated[str | None, typer.Option(help="Presets, comma separated (default: all).")] = None,
    ops: Annotated[
        str | None, typer.Option(help="Op targets, comma separated: onnx, ort, decomposed (default: each preset's).")
    ] = None,
    dtypes: Annotated[str | None, typer.Option(help="dtypes, comma separated: fp32, fp16, bf16.")] = None,
    runtimes: Annotated[
        str | None, typer.Option(help="Runtimes, comma separated, as for verify (default: all).")
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="The small CI set: every preset at <= 256 positions in fp32/fp16, and llama-rope at 8192 on every "
            "target.",
        ),
    ] = False,
    shard: Annotated[
        str | None, typer.Option(help="i/n: run every n-th case starting at the i-th, for CI fleets.")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write the report: FILE.md (Markdown) or FILE.json.")] = None,
    bundles: Annotated[
        Path | None,
        typer.Option(help="Folder for reproduction bundles of failed cases (default: matrix-repro here)."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random verification inputs.")] = 0,
    probe_bounds: Annotated[
        bool,
        typer.Option(
            "--probe-bounds",
            help="Also feed positions -1 and the table length to every runtime (silent / aborts in the compatibility "
            "table).",
        ),
    ] = False,
    compat: Annotated[
        Path | None,
        typer.Option(help="Write the compatibility table (kind x op x dtype x runtime) alone to FILE.md."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
):
    """Export and verify every combination into a temporary folder, then print a summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pe_export.cli.common import fail, out, parse_runtimes
    from pe_export.files import check_output_path, write_atomic
    from pe_export.pipeline.artifact import free_folder
    from pe_export.runtimes import DEFAULT_RUNTIMES
    from pe_export.tools import matrix
    from pe_export.verification.parity import FAILED
    from pe_export.verification.report import render

    def split(option: str, text: str | None, valid) -> list[str] | None:
        if text is None:
            return None
        names = [v.strip() for v in text.split(",") if v.strip()]
        if not names:  # an empty list given on purpose is a slip, not "all"
            fail(f"{option} takes a comma-separated list of {', '.join(valid)}; got {text!r}")
        return names

    from pe_export.dtypes import DTYPES
    from pe_export.presets import PRESETS
    from pe_export.spec import OP_NAMES

    chosen = parse_runtimes(runtimes) if runtimes is not None else DEFAULT_RUNTIMES
    presets, ops, dtypes = (
        split("--presets", presets, PRESETS),
        split("--ops", ops, OP_NAMES),
        split("--dtypes", dtypes, DTYPES),
    )
    try:
        todo = matrix.cases(presets, ops, dtypes, quick)
        if shard:
            todo = matrix.shard(todo, *matrix.parse_shard(shard))
        for path in (report, compat):
            if path is not None:
                check_output_path(path, force)
    except ValueError as e:
        fail(str(e))
    if not todo:
        fail("no case matches these --presets/--ops/--dtypes (an op a preset's encoding does not lower to is left out)")
    bundle_dir = free_folder(bundles or Path("matrix-repro"))
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        tempfile.TemporaryDirectory(prefix="pe-export-matrix-") as tmp,
        Progress(*columns, console=out, transient=True) as bar,
    ):
        task = bar.add_task("matrix", total=len(todo))
        for case in todo:
            bar.update(task, description=f"{case.preset} {case.op} {case.dtype}")
            results.append(matrix.run_case(case, Path(tmp), chosen, seed, bundle_dir, bounds=probe_bounds))
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
            if r["verdict"] in FAILED:
                out.print(f"  {case} {r['runtime']}: {r['note']}", soft_wrap=True)
        if c["error"]:
            out.print(f"  {case} export: {c['error']}", soft_wrap=True)
        if c["bundle"]:
            out.print(f"  reproduction bundle: {c['bundle']}", soft_wrap=True)
        if c["bundle_error"]:
            out.print(f"  {case}: could not write the reproduction bundle: {c['bundle_error']}", soft_wrap=True)
    s = matrix.summary(results)
    counts = ", ".join(f"{s[v]} {v}" for v in matrix.VERDICTS if s[v] or v in ("pass", "FAIL", "skipped"))
    out.print(f"{s['cases']} cases, {s['rows']} rows: {counts}; slowest: {s['slowest']}")
    header, rows = matrix.compat(results, chosen)
    table = Table(*header, title="compatibility: encoding kind x op target x dtype x runtime")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    command = _command(presets, ops, dtypes, chosen, quick, shard, seed, probe_bounds)
    if s["unverified_cases"]:
        out.print(f"unverified (no runtime here can run them): {', '.join(s['unverified_cases'])}", soft_wrap=True)
    if report is not None:
        doc = {
            "mode": "quick" if quick else "full",
            "shard": shard or "",
            "runtimes": list(chosen),
            "summary": s,
            "cases": results,
            "command": command,
            "compat": {"header": header, "rows": rows},
        }
        text = render(doc, report)
        if report.suffix.lower() == ".md":
            text += ("\n" + matrix.compat_markdown(results, chosen, command)).encode()
        try:
            write_atomic(text, report, force)
        except ValueError as e:
            fail(str(e))
        out.print(f"wrote {report}")
    if compat is not None:
        try:
            write_atomic(matrix.compat_markdown(results, chosen, command).encode(), compat, force)
        except ValueError as e:
            fail(str(e))
        out.print(f"wrote {compat}")
    if s["failed_cases"]:
        fail(f"{s['failed_cases']} of {s['cases']} cases failed", 1)


def _command(presets, ops, dtypes, runtimes, quick, shard, seed, probe_bounds) -> str:
    """The command line that regenerates this run (for the reports)."""
    import shlex

    words = ["pe-export", "matrix"] + (["--quick"] if quick else [])
    for option, values in (("--presets", presets), ("--ops", ops), ("--dtypes", dtypes)):
        words += [option, ",".join(values)] if values else []
    words += (
        ["--runtimes", ",".join(runtimes)]
        + (["--shard", shard] if shard else [])
        + (["--seed", str(seed)] if seed else [])
    )
    return shlex.join(words + (["--probe-bounds"] if probe_bounds else []))


def _cell(row) -> str:
    if row is None:
        return ""
    if row["verdict"] == "pass":
        return f"pass {row['worst_ratio']:.2f}"
    return row["verdict"]


app = typer.Typer()
app.command("matrix")(matrix_command)
