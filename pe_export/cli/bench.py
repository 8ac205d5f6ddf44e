"""`pe-export bench FILE`: time an exported graph under ONNX Runtime (and tract, ort-web) against a
memcpy of the same bytes (see pe_export.tools.bench for the shapes and the byte model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def bench_command(
    file: Annotated[Path, typer.Argument(help="An ONNX file written by pe-export.")],
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers, comma separated: cpu, cuda.")] = "cpu",
    runtimes: Annotated[
        str | None,
        typer.Option(
            help="Also time these runtimes, comma separated: tract, ort-web, ort-web-browser, ort-web-browser-webgpu "
            "(each against the same run's ORT CPU memcpy)."
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="ORT intra_op_num_threads (and the memcpy's; the ort-web runtimes' WASM threads).")
    ] = 2,
    seq: Annotated[
        int | None,
        typer.Option(
            help="Prefill length S (default: min(4096, table length); 1024 for bias and attention; a static-shapes "
            "file's own S)."
        ),
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size B (default 1; a static-shapes file's own B).")] = None,
    heads: Annotated[
        int | None, typer.Option(help="Heads H of a rotary graph's x (default 32; other graphs keep their own).")
    ] = None,
    repeat: Annotated[int, typer.Option(help="Timed calls per prefill case (decode takes at least 200).")] = 20,
    profile: Annotated[
        bool, typer.Option(help="Also show where the prefill's time goes, by op type (ORT's profiler).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Measure prefill throughput (GB/s and ratio to a same-bytes memcpy) and decode latency (p50, p90, p99)."""
    from rich.table import Table

    from pe_export.cli.common import fail, out, parse_runtimes
    from pe_export.tools.bench import BENCH_RUNTIMES, bench_file

    names = [p.strip() for p in providers.split(",") if p.strip()]
    others = parse_runtimes(runtimes, BENCH_RUNTIMES) if runtimes is not None else ()
    try:
        result = bench_file(
            file,
            providers=tuple(dict.fromkeys(names)),
            threads=threads,
            seq=seq,
            batch=batch,
            heads=heads,
            repeat=repeat,
            profile=profile,
            runtimes=others,
        )
    except ValueError as e:  # BadInput included
        fail(str(e))
    except RuntimeError as e:  # a session that did not land on the provider asked for
        fail(str(e), 1)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(
        "case", "provider", "shapes", "MB", "op ms", "GB/s", "memcpy GB/s", "op / memcpy", "p50 ms", "p90 ms", "p99 ms"
    )
    for c in result.cases:
        shapes = " ".join("x".join(map(str, s)) for s in c.shapes.values())
        ratio = f"{c.ratio:.2f}" if c.ratio is not None else "-"
        memcpy = f"{c.memcpy_gbps:.1f}" if c.memcpy_gbps is not None else "-"
        table.add_row(
            c.name,
            c.provider,
            shapes,
            f"{c.bytes / 1e6:.1f}",
            f"{c.op_s * 1e3:.3f}",
            f"{c.gbps:.2f}",
            memcpy,
            ratio,
            f"{c.p50_ms:.3f}",
            f"{c.p90_ms:.3f}",
            f"{c.p99_ms:.3f}",
        )
    out.print(table)
    out.print(f"bytes: {result.byte_model}", soft_wrap=True)
    for note in dict.fromkeys(c.note for c in result.cases):
        out.print(f"  {note}", soft_wrap=True)
    for provider, shares in result.time_by_op.items():
        table = Table(
            "op type",
            "share of the run",
            title=f"where the {result.cases[0].name}'s time goes on {provider} (ORT profiler)",
        )
        for op, share in shares:
            table.add_row(op, f"{share:.0%}")
        out.print(table)


app = typer.Typer()
app.command("bench")(bench_command)
