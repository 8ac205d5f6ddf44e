"""`pe-export audit`: check the RoPE of an exported model against float64, writing nothing (see
pe_export.rewriter.site_audit). The command a team runs in its model-release CI.

pe-export audit MODEL.onnx --config CONFIG.json [--seq N] [--runtimes ...] [--report FILE.json|.md] [--force]

Exit codes: 0 every site within the fp32 bound at every checked position, 1 otherwise, 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pe_export.cli.common import fail, out
from pe_export.rewriter import DEFAULT_RUNTIMES, RUNTIMES


def audit_command(
    model: Annotated[Path, typer.Argument(help="The exported model (.onnx; external data beside it is read).")],
    config: Annotated[Path | None, typer.Option(help="The model's local config.json (Hugging Face layout).")] = None,
    seq: Annotated[
        int | None,
        typer.Option(min=1, help="The context: positions checked up to N - 1 (default: max_position_embeddings)."),
    ] = None,
    runtimes: Annotated[
        str,
        typer.Option(help=f"Runtimes that run the model, comma separated, each in a worker: {', '.join(RUNTIMES)}."),
    ] = ",".join(DEFAULT_RUNTIMES),
    report: Annotated[Path | None, typer.Option(help="Write the report: FILE.md (Markdown) or FILE.json.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
):
    """Check every RoPE site's cos/sin (or caches) against float64 up to the end of the context; write nothing.
    Exit 0 when every site is within the fp32 bound, 1 otherwise."""
    from rich.table import Table

    from pe_export.errors import BadInput
    from pe_export.rewriter.site_audit import audit

    try:
        result = audit(model, config, seq, runtimes, report, force)
    except BadInput as e:
        fail(str(e))
    table = Table(
        "site", "rule", "checked", "rows", "context", "worst error", "at", "bound", "verdict", "rewrite would"
    )
    for s in result.sites:
        table.add_row(
            str(s.site),
            s.rule,
            s.what,
            str(s.rows),
            str(s.context),
            "-" if s.worst_error is None else f"{s.worst_error:.2e}",
            "-" if s.worst_position is None else str(s.worst_position),
            f"{s.bound:.1e}",
            s.verdict + (f": {s.note}" if s.note else ""),
            s.change,
        )
    out.print(table)
    for f in result.frozen:
        out.print(f"frozen: {f}")
    out.print(f"audit: {result.verdict}" + (f" (report {report})" if report is not None else ""))
    if result.verdict != "pass":
        raise typer.Exit(1)


app = typer.Typer()
app.command("audit")(audit_command)
