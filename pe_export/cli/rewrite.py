"""`pe-export rewrite`: make the RoPE inside an exported model exact (see pe_export.rewriter).

pe-export rewrite MODEL.onnx --config CONFIG.json [--seq N] [--op tables|onnx|ort|decomposed]
    [-o OUT.onnx] [--force] [--runtimes ...] [--report FILE.json|.md]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pe_export.cli.common import choices, fail, out
from pe_export.rewriter import DEFAULT_RUNTIMES, OPS, RUNTIMES

RewriteOp = choices("RewriteOp", OPS)


def rewrite_command(
    model: Annotated[Path, typer.Argument(help="The exported model (.onnx; external data beside it is read).")],
    config: Annotated[Path | None, typer.Option(help="The model's local config.json (Hugging Face layout).")] = None,
    seq: Annotated[
        int | None,
        typer.Option(
            min=1, help="Table length: the largest position + 1 (default: the config's max_position_embeddings)."
        ),
    ] = None,
    op: Annotated[
        RewriteOp,
        typer.Option(
            help="tables: only cos/sin become a Gather of float64-built tables; onnx|ort|decomposed: each q/k "
            "rotation also becomes pe-export's lowering."
        ),
    ] = RewriteOp("tables"),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output file (default: MODEL.pe.onnx beside the model).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output or report.")] = False,
    runtimes: Annotated[
        str,
        typer.Option(
            help=f"Runtimes that verify the rewrite, comma separated, each in a worker process with a time limit: "
            f"{', '.join(RUNTIMES)}."
        ),
    ] = ",".join(DEFAULT_RUNTIMES),
    report: Annotated[Path | None, typer.Option(help="Write the report: FILE.md (Markdown) or FILE.json.")] = None,
):
    """Replace the float32 cos/sin of every RoPE site by float64-built tables, check it against the config
    first, and verify the result."""
    from rich.table import Table

    from pe_export.errors import BadInput
    from pe_export.rewriter.run import rewrite_and_verify

    try:
        run = rewrite_and_verify(model, config, seq, op.value, output, force, runtimes, report)
    except BadInput as e:
        fail(str(e))
    result, site_rows, whole_rows = run.result, run.site_rows, run.whole_rows
    table = Table(
        "site",
        "rule",
        "rotary dim",
        "scaling",
        "checked",
        "runtime",
        "last position",
        "original error",
        "rewritten error",
        "bound",
        "verdict",
    )
    for r in site_rows:
        s = result.sites[r.site]
        last = (
            [str(r.positions[-1]), _num(r.original_error[-1]), _num(r.rewritten_error[-1]), f"{r.bound:.1e}"]
            if r.rewritten_error
            else [""] * 4
        )
        table.add_row(
            str(r.site),
            s.rule,
            str(s.params["rotary_dim"]),
            s.params["scaling"],
            r.what,
            r.runtime,
            *last,
            r.verdict + (f": {r.note}" if r.note else ""),
        )
    out.print(table)
    for note in dict.fromkeys(s.restored for s in result.sites if s.restored):
        out.print(f"restored: {note}")
    for r in whole_rows:
        result_text = (
            f"original vs rewritten max abs diff {r.max_abs_diff:.2e} (bound {r.bound:.1e})"
            if r.max_abs_diff is not None
            else r.note
        )
        out.print(f"whole model ({r.runtime}), positions 0-{r.positions - 1}: {result_text}: {r.verdict}")
    out.print(f"wrote {run.output}" + (f" and {report}" if report is not None else ""))
    if run.verdict == "unverified":
        fail(f"no runtime of {', '.join(run.runtimes)} checked a site; {run.output} is written but unverified", 1)
    if run.verdict != "pass":
        raise typer.Exit(1)


def _num(x) -> str:
    return "-" if x is None else f"{x:.2e}"


app = typer.Typer()
app.command("rewrite")(rewrite_command)
