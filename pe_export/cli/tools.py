"""`pe-export inspect` and `pe-export plot` (see pe_export.tools.inspection and pe_export.tools.plot)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pe_export.tools.plot import KINDS

PlotKind = Enum("PlotKind", {k: k for k in KINDS}, type=str)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _shape(shape) -> str:
    return "?" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def inspect_command(
    file: Annotated[Path, typer.Argument(help="An ONNX file (one pe-export wrote, or any other).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
):
    """Show what an ONNX file holds (ops, opsets, inputs and outputs, initializers, external data, the
    pe-export spec) and which runtimes here can load it."""
    from rich.table import Table

    from pe_export.cli.common import fail, out
    from pe_export.tools.inspection import inspect_file

    try:
        doc = inspect_file(file)
    except ValueError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    opsets = ", ".join(f"{d} {v}" for d, v in doc["opset_imports"].items())
    out.print(
        f"{doc['file']}: {_size(doc['total_bytes'])}, IR version {doc['ir_version']}, opsets {opsets}"
        + (f", producer {doc['producer']}" if doc["producer"] else ""),
        soft_wrap=True,
        markup=False,
    )
    io = Table("", "name", "dtype", "shape", title="inputs and outputs")
    for side in ("inputs", "outputs"):
        for v in doc[side]:
            io.add_row(side[:-1], v["name"], v["dtype"], _shape(v["shape"]))
    out.print(io)
    ops = Table("op", "count", title=f"ops ({sum(o['count'] for o in doc['ops'])} nodes)")
    for o in doc["ops"]:
        ops.add_row(o["op"], str(o["count"]))
    out.print(ops)
    if doc["functions"]:
        out.print("local functions: " + ", ".join(doc["functions"]), markup=False)
    inits = Table("name", "shape", "dtype", "bytes", title=f"initializers ({_size(doc['initializer_bytes'])})")
    for t in doc["initializers"]:
        inits.add_row(
            t["name"], _shape(t["shape"]), t["dtype"], _size(t["bytes"]) + (" (external)" if t["external"] else "")
        )
    out.print(inits)
    for e in doc["external_data"]:
        out.print(
            f"external data: {e['location']} ({_size(e['bytes'])}): {', '.join(e['tensors'])}",
            soft_wrap=True,
            markup=False,
        )
    for key in ("spec", "derived"):
        if doc[key] is not None:
            out.print(f"pe_export.{key}:", markup=False)
            out.print(json.dumps(doc[key], indent=2, sort_keys=True), markup=False)
    if doc["spec"] is None:
        out.print("no pe_export.spec: not written by pe-export (runtimes tried directly)")
    for k, v in doc["metadata"].items():
        out.print(f"metadata {k}: {v}", soft_wrap=True, markup=False)
    runtimes = Table("runtime", "result", "provider", "note", title="runtimes")
    for r in doc["runtimes"]:
        runtimes.add_row(r["runtime"], r["result"], r["provider"], r["note"])
    out.print(runtimes)


def plot_command(
    source: Annotated[
        str, typer.Argument(help="A preset name, an ONNX file pe-export wrote, or a verify report (.json).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG file to write.")],
    kind: Annotated[
        PlotKind | None,
        typer.Option(
            help="One plot: heatmap (tables or biases), decay and frequencies (RoPE), error (a verify report). "
            "Default: every one that applies."
        ),
    ] = None,
    seq: Annotated[int | None, typer.Option(help="A preset's table length (max_positions).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
):
    """Plot an encoding (RoPE cos/sin tables, long-term decay and frequencies; bias and absolute
    heatmaps) or the error by position of a verify report. Needs matplotlib, the `plot` extra."""
    from pe_export.cli.common import fail, out
    from pe_export.tools.plot import plot

    try:
        _, kinds, size = plot(source, output, kind.value if kind else None, seq, force)
    except ValueError as e:
        fail(str(e))
    out.print(f"wrote {output} ({', '.join(kinds)}; {size / 1024:.0f} KiB)", markup=False)


app = typer.Typer()
app.command("inspect")(inspect_command)
app.command("plot")(plot_command)
