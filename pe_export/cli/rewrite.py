"""`pe-export rewrite`: make the RoPE inside an exported model exact (see pe_export.rewriter).

pe-export rewrite MODEL.onnx --config CONFIG.json [--seq N] [--op tables|onnx|ort|decomposed]
    [-o OUT.onnx] [--force] [--runtimes ...] [--report FILE.json|.md]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pe_export.cli.common import choices, fail, out

OPS = ("tables", "onnx", "ort", "decomposed")  # pe_export.rewriter.core.OPS, import-free
RUNTIMES = (
    "ort-cpu",
    "ort-cpu-noopt",
    "ort-cuda",
    "onnx-reference",
    "openvino",
    "tract",
    "ort-web",
    "ort-web-browser",
    "ort-web-browser-webgpu",
    "iree",
    "litert",
)  # pe_export.rewriter.checks.RUNTIMES
DEFAULT_RUNTIMES = ("ort-cpu", "ort-cpu-noopt")  # pe_export.rewriter.checks.DEFAULT_RUNTIMES
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
    from pe_export.pipeline.onnx_export import check_output_path, write_atomic

    chosen = tuple(dict.fromkeys(r.strip() for r in runtimes.split(",") if r.strip()))
    if not chosen or any(r not in RUNTIMES for r in chosen):
        fail(f"--runtimes takes a comma-separated list of {', '.join(RUNTIMES)}; got {runtimes!r}")
    output = output or model.with_name(f"{model.stem}.pe.onnx")
    try:
        check_output_path(output, force)
        if report is not None:
            check_output_path(report, force)
        from pe_export.rewriter import apply as api
        from pe_export.rewriter import cache_checks as verify_caches
        from pe_export.rewriter import checks as verify
        from pe_export.rewriter.rewrite_report import document, render

        original = api.load(model)
        if config is None:
            fail(f"rewrite needs --config CONFIG.json (the model's config.json); {api.describe(original)}")
        rewritten = api.load(model)
        result = api.rewrite(rewritten, config, seq, op.value)
    except BadInput as e:
        fail(str(e))
    api.prune(result.model)  # verify what is written
    site_rows = verify.check_sites(original, result.model, result.sites, chosen)
    site_rows = sorted(
        site_rows + verify_caches.check_caches(original, result.model, result.sites, chosen), key=lambda r: r.site
    )
    whole_rows = verify.check_whole(original, result.model, chosen, cache_dims=verify.cache_dims_of(config))
    try:
        api.save(result.model, output, force)
        if report is not None:
            write_atomic(render(document(result.spec, site_rows, whole_rows), report), report, force)
    except BadInput as e:
        fail(str(e))
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
    for r in whole_rows:
        result_text = (
            f"original vs rewritten max abs diff {r.max_abs_diff:.2e} (bound {r.bound:.1e})"
            if r.max_abs_diff is not None
            else r.note
        )
        out.print(f"whole model ({r.runtime}), positions 0-{r.positions - 1}: {result_text}: {r.verdict}")
    out.print(f"wrote {output}" + (f" and {report}" if report is not None else ""))
    if verify.failed([*site_rows, *whole_rows]):
        if not any(r.verdict == "pass" for r in site_rows):
            fail(f"no runtime of {', '.join(chosen)} checked a site; {output} is written but unverified", 1)
        raise typer.Exit(1)


def _num(x) -> str:
    return "-" if x is None else f"{x:.2e}"


app = typer.Typer()
app.command("rewrite")(rewrite_command)
