"""The standard benchmark: every RoPE op target x dtype on Llama-shaped input, two straightforward
decomposed graphs as baselines, and where the time of `export + verify` goes. Writes a Markdown report.

    python benchmarks/run.py [--output benchmarks/results.md] [--threads 2] [--repeat 20]

x is 1 x 32 x 4096 x 128 (prefill at the last 4096 positions of llama-rope's 8192-row table) and a
single-token decode at position 8191; ORT CPU with `--threads` intra-op threads (pe_export.tools.bench). The
headline is each graph's ratio to a memcpy of the same bytes timed in the same rounds of the same
process: absolute times move with the machine's load, ratios much less.

Baselines (issue 6), built with onnx.helper from the same float64 tables rounded once to the dtype:
- `rotate-half, Split/Concat, full tables`: x * [c, c] + Concat(-x2, x1) * [s, s]
- `half tables, Mul/Sub/Add pairs`: Concat(x1 * c - x2 * s, x2 * c + x1 * s)
Candidate (issue 15): `decomposed, cast once in/out` (fp16): the decomposed file with x cast to float32
once, the tables stored in float32 (the same fp16 values, exactly), the arithmetic in float32 and one
Cast of y back to fp16; ORT CPU otherwise wraps every fp16 Mul and Add in a Cast pair. The lowering
keeps it only if it is faster at the same rounding bound.

Edge runtimes (issue 15): the `onnx` and `decomposed` files on tract and ort-web (onnxruntime-web's
WASM backend under Node), each timed in its worker against the same run's ORT CPU memcpy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

PRESET = "llama-rope"
DTYPES = ("fp32", "fp16")


def llama_spec(op: str, dtype: str, max_positions: int):
    from pe_export.custom_ops.lowerings import OP_TARGETS
    from pe_export.presets import PRESETS
    from pe_export.spec import Spec

    params = {**PRESETS[PRESET].params, "max_positions": max_positions}
    return Spec(encoding="rope", params=params, op=op, opset=OP_TARGETS[op].min_opset, dtype=dtype, layout="bhsd")


def baseline(spec, kind: str) -> bytes:
    """One of the two straightforward decomposed graphs of the issue, for x (B, H, S, D), position_ids (B, S)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pe_export.dtypes import numpy_dtype
    from pe_export.encodings.rope import RopeParams, tables

    p = RopeParams(**spec.params)
    cos, sin = tables(p)  # (P, R/2) float64
    half, dt = p.rotary_dim // 2, numpy_dtype(spec.dtype)
    elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}[spec.dtype]
    N = helper.make_node
    if kind == "split-concat":
        inits = {"cos": np.concatenate([cos, cos], -1), "sin": np.concatenate([sin, sin], -1)}  # (P, R)
        body = [
            N("Split", ["x", "halves"], ["x1", "x2"], axis=-1),
            N("Neg", ["x2"], ["nx2"]),
            N("Concat", ["nx2", "x1"], ["rx"], axis=-1),  # rotate_half(x)
            N("Mul", ["x", "c"], ["xc"]),
            N("Mul", ["rx", "s"], ["rs"]),
            N("Add", ["xc", "rs"], ["y"]),
        ]
    else:
        inits = {"cos": cos, "sin": sin}  # (P, R/2)
        body = [
            N("Split", ["x", "halves"], ["x1", "x2"], axis=-1),
            N("Mul", ["x1", "c"], ["x1c"]),
            N("Mul", ["x2", "s"], ["x2s"]),
            N("Sub", ["x1c", "x2s"], ["y1"]),
            N("Mul", ["x2", "c"], ["x2c"]),
            N("Mul", ["x1", "s"], ["x1s"]),
            N("Add", ["x2c", "x1s"], ["y2"]),
            N("Concat", ["y1", "y2"], ["y"], axis=-1),
        ]
    gather = [
        N("Gather", ["cos", "position_ids"], ["cg"]),
        N("Gather", ["sin", "position_ids"], ["sg"]),
        N("Unsqueeze", ["cg", "heads_axis"], ["c"]),  # (B, 1, S, .)
        N("Unsqueeze", ["sg", "heads_axis"], ["s"]),
    ]
    initializers = [numpy_helper.from_array(v.astype(dt), k) for k, v in inits.items()]
    initializers += [
        numpy_helper.from_array(np.array([half, half], np.int64), "halves"),
        numpy_helper.from_array(np.array([1], np.int64), "heads_axis"),
    ]
    graph = helper.make_graph(
        gather + body,
        kind,
        [
            helper.make_tensor_value_info("x", elem, ["B", "H", "S", p.head_dim]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"]),
        ],
        [helper.make_tensor_value_info("y", elem, ["B", "H", "S", p.head_dim])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def cast_once(model_bytes: bytes) -> bytes:
    """The fp16 file computing in float32 between one Cast in and one Cast out (see the docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    g = model.graph
    x, y = g.input[0].name, g.output[0].name
    wide = lambda t: numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)  # noqa: E731
    for node in g.node:
        node.input[:] = [x + "_f32" if i == x else i for i in node.input]
        node.output[:] = [y + "_f32" if o == y else o for o in node.output]
        for a in node.attribute:
            if a.HasField("t") and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(wide(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT16:
            g.initializer[i].CopyFrom(wide(t))
    g.node.insert(0, helper.make_node("Cast", [x], [x + "_f32"], to=TensorProto.FLOAT))
    g.node.append(helper.make_node("Cast", [y + "_f32"], [y], to=TensorProto.FLOAT16))
    del g.value_info[:]
    return model.SerializeToString()


def parity(spec, model_bytes: bytes) -> float:
    """Worst error / verify bound of a graph on the standard probes under ORT CPU (< 1 passes)."""
    from pe_export.verification.parity import check

    rows = check(spec, model_bytes, ("ort-cpu",))
    return rows[0].worst_ratio if rows[0].verdict == "pass" else float("inf")


def stages(seq: int) -> list[tuple[str, float]]:
    """Seconds of each stage of `pe-export llama-rope --seq N` (imports, export, checker, verify on each
    runtime); run in a fresh process (`--stages N`) so that first-call costs count as a user sees them."""
    t = time.perf_counter()
    import onnx
    import torch  # noqa: F401

    from pe_export.encodings.attention import encoding_for
    from pe_export.encodings.probing import make_probes
    from pe_export.pipeline.onnx_export import build
    from pe_export.runtimes import DEFAULT_RUNTIMES
    from pe_export.verification.parity import check

    done = [("imports (torch, onnx, pe_export)", time.perf_counter() - t)]
    spec = llama_spec("onnx", "fp32", seq)
    t = time.perf_counter()
    model = build(spec)  # torch.onnx.export + the full checker
    built = time.perf_counter() - t
    t = time.perf_counter()
    onnx.checker.check_model(model, full_check=True)
    checker = time.perf_counter() - t
    done += [("export (torch.onnx.export, metadata)", built - checker), ("onnx checker, full_check", checker)]
    data = model.SerializeToString()
    t = time.perf_counter()
    enc = encoding_for(spec)
    for _, inputs in make_probes(spec):
        enc.reference(spec, inputs)
    reference = time.perf_counter() - t
    done.append(("verify: probes + float64 reference", reference))
    for runtime in DEFAULT_RUNTIMES:
        t = time.perf_counter()
        rows = check(spec, data, (runtime,))
        # check() rebuilds the probes and the reference on each call: they are counted once, above.
        done.append((f"verify: {runtime} ({rows[0].verdict})", max(time.perf_counter() - t - reference, 0.0)))
    return done


def end_to_end(seq: int) -> tuple[list[tuple[str, float]], float]:
    """(the stages, measured in a fresh process; the wall time of the real command in another)."""
    import json
    import subprocess
    import tempfile

    text = subprocess.run(
        [sys.executable, __file__, "--stages", str(seq)], check=True, capture_output=True, text=True
    ).stdout
    measured = [tuple(s) for s in json.loads(text.strip().splitlines()[-1])]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run(["pe-export", PRESET, "--seq", str(seq), "-o", f"{tmp}/m.onnx"], check=True, capture_output=True)
        wall = time.perf_counter() - t
    return measured, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=Path(__file__).with_name("results.md"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--seq", type=int, default=4096, help="prefill length S")
    ap.add_argument("--table", type=int, default=8192, help="table length P (llama-rope's context)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--e2e-seq", type=int, default=8192, help="--seq of the export + verify run (0: skip it)")
    ap.add_argument(
        "--runtimes",
        default="tract,ort-web",
        help="other runtimes to time the onnx and decomposed files on ('' for none)",
    )
    ap.add_argument("--stages", type=int, default=None, help=argparse.SUPPRESS)  # the fresh process of end_to_end
    args = ap.parse_args(argv)
    if args.stages is not None:
        import json

        print(json.dumps(stages(args.stages)))
        return 0

    import onnxruntime

    from pe_export.pipeline.onnx_export import build
    from pe_export.tools.bench import bench, time_by_op

    load_at_start = os.getloadavg()[0]
    graphs = []  # (name, dtype, spec, model bytes)
    for dtype in DTYPES:
        for op in ("onnx", "ort", "decomposed"):
            spec = llama_spec(op, dtype, args.table)
            graphs.append((f"{op}", dtype, spec, build(spec).SerializeToString()))
        spec = llama_spec("decomposed", dtype, args.table)
        if dtype == "fp16":
            graphs.append(("candidate: decomposed, cast once in/out", dtype, spec, cast_once(graphs[-1][3])))
        graphs.append(("baseline: rotate-half, Split/Concat, full tables", dtype, spec, baseline(spec, "split-concat")))
        graphs.append(("baseline: half tables, Mul/Sub/Add pairs", dtype, spec, baseline(spec, "half-tables")))

    rows = []
    for name, dtype, spec, data in graphs:
        print(f"bench {name} {dtype}", file=sys.stderr)
        r = bench(spec, data, threads=args.threads, seq=args.seq, heads=args.heads, repeat=args.repeat)
        prefill, decode = r.cases
        shares = time_by_op(spec, data, threads=args.threads, seq=args.seq, heads=args.heads, repeat=args.repeat)
        where = ", ".join(f"{op} {share:.0%}" for op, share in shares if share >= 0.02)
        rows.append((name, dtype, prefill, decode, parity(spec, data), where))

    edge = []  # (graph, dtype, runtime, prefill, decode) on tract and ort-web
    if args.runtimes:
        for name, dtype, spec, data in graphs:
            if name not in ("onnx", "decomposed"):
                continue
            print(f"bench {name} {dtype} on {args.runtimes}", file=sys.stderr)
            r = bench(
                spec,
                data,
                providers=(),
                threads=args.threads,
                seq=args.seq,
                heads=args.heads,
                repeat=args.repeat,
                runtimes=tuple(args.runtimes.split(",")),
            )
            for i in range(0, len(r.cases), 2):
                edge.append((name, dtype, r.cases[i].runtime, r.cases[i], r.cases[i + 1]))

    measured, wall = end_to_end(args.e2e_seq) if args.e2e_seq else ([], 0.0)
    fp32_bytes = rows[0][2].bytes

    lines = [
        "# pe-export benchmark",
        "",
        f"`python benchmarks/run.py --threads {args.threads} --repeat {args.repeat}`: llama-rope (P = {args.table}), "
        f"prefill x of 1 x {args.heads} x {args.seq} x 128 at the last {args.seq} positions, decode 1 x {args.heads} "
        f"x 1 x 128 at "
        f"position {args.table - 1}; ONNX Runtime {onnxruntime.__version__} CPU, intra_op_num_threads = "
        f"{args.threads}, "
        f"graph optimisations on; {platform.machine()}, {len(os.sched_getaffinity(0))} cores visible, load average "
        f"{load_at_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (a shared machine: above the core "
        f"count, "
        "other work ran beside this one).",
        "",
        f"Bytes counted: {fp32_bytes / 1e6:.1f} MB per fp32 prefill call (x read, y written, cos/sin rows gathered). "
        f"`vs memcpy` = time of ORT copying the same bytes (a graph that copies x into y, float32 Mul by 1, with the "
        f"same "
        f"intra_op_num_threads = {args.threads}) / time of the graph, both timed in turn in the same rounds: 1.0 "
        f"runs at the "
        "speed of memory with those threads. Absolute times move with the load of the (shared) machine; "
        "compare ratios.",
        "",
        "| graph | dtype | prefill vs memcpy | prefill GB/s | memcpy GB/s | prefill ms | decode p50 us | decode p99 "
        "us | worst err / bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, dtype, pf, dc, worst, _ in rows:
        lines.append(
            f"| {name} | {dtype} | {pf.ratio:.2f} | {pf.gbps:.2f} | {pf.memcpy_gbps:.1f} | {pf.op_s * 1e3:.1f} | "
            f"{dc.p50_ms * 1e3:.1f} | {dc.p99_ms * 1e3:.1f} | {worst:.2f} |"
        )
    fp16 = {name: pf for name, dtype, pf, _, _, _ in rows if dtype == "fp16"}
    fp32 = {name: pf for name, dtype, pf, _, _, _ in rows if dtype == "fp32"}
    if "decomposed" in fp16 and "decomposed" in fp32:
        lines += [
            "",
            "fp16 against fp32 (bytes per second of the fp16 graph / of the fp32 graph, same run; 0.5 = the fp16 "
            "graph takes "
            "as long as the fp32 one, 1.0 = it is twice as fast, as its halved bytes allow): "
            + ", ".join(
                f"{n} {fp16[n].gbps / fp32[k].gbps:.2f}"
                for n, k in (
                    ("onnx", "onnx"),
                    ("ort", "ort"),
                    ("decomposed", "decomposed"),
                    ("candidate: decomposed, cast once in/out", "decomposed"),
                )
                if n in fp16 and k in fp32
            )
            + ".",
        ]
    if edge:
        lines += [
            "",
            "## Other runtimes",
            "",
            "The same prefill and decode on tract and ort-web (`pe-export bench FILE --runtimes tract,ort-web`), "
            "each timed by "
            "the runtime's own loop in its worker process; `vs memcpy` is to the same run's ORT CPU copy of the same "
            "bytes "
            f"({args.threads} threads), timed just before and after. tract's Python API sets no thread count; "
            f"ort-web runs "
            f"{args.threads} WASM threads.",
            "",
            "| graph | dtype | runtime | prefill vs ORT memcpy | prefill GB/s | prefill ms | decode p50 us | decode "
            "p99 us |",
            "|---|---|---|---|---|---|---|---|",
            *[
                f"| {name} | {dtype} | {pf.provider} | {pf.ratio:.2f} | {pf.gbps:.2f} | {pf.op_s * 1e3:.1f} | "
                f"{dc.p50_ms * 1e3:.1f} | "
                f"{dc.p99_ms * 1e3:.1f} |"
                for name, dtype, _, pf, dc in edge
            ],
        ]
    lines += [
        "",
        "## Where each prefill's time goes",
        "",
        "ORT's profiler over the same prefill (`pe-export bench FILE --profile`): each op type's share of the run, "
        "after "
        "ORT's graph optimisations (so the op types ORT actually ran, Casts it inserted included); shares under 2% "
        "left out.",
        "",
        "| graph | dtype | time by op type |",
        "|---|---|---|",
        *[f"| {name} | {dtype} | {where} |" for name, dtype, _, _, _, where in rows],
    ]
    if measured:
        total = sum(s for _, s in measured)
        lines += [
            "",
            f"## Where the time of `pe-export {PRESET} --seq {args.e2e_seq}` goes (export + verify, fp32, op onnx)",
            "",
            "Stages timed one by one in a fresh Python process (first-call costs included); the last row is the wall "
            "time of the real command, run on its own.",
            "",
            "| stage | s | share |",
            "|---|---|---|",
            *[f"| {name} | {s:.2f} | {s / total:.0%} |" for name, s in measured],
            f"| sum of the stages | {total:.2f} | |",
            f"| `pe-export {PRESET} --seq {args.e2e_seq}`, wall time | {wall:.2f} | |",
        ]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
