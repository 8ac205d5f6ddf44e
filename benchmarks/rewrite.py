"""`pe-export rewrite` on ORT CPU: the original torch.onnx export of a Llama-3.1-shaped model against the
rewritten model for each --op, in one run: a 2048-token prefill and a one-token decode at position 100000.

    python benchmarks/rewrite.py [--hidden 2048] [--heads 16] [--layers 2] [--prefill 2048] [--repeat 3]
        [--threads 2] [--output FILE.md]
    python benchmarks/rewrite.py --accuracy [FAMILY ...]   # the logits error table of docs/rewrite.md

The model: transformers 5.23 Llama (random weights, llama3 scaling x8, theta 5e5, 131072 positions),
exported with torch.onnx.export(dynamo=True), inputs (input_ids, position_ids) -> logits, no KV cache
(the decode is one token at position 100000). Each variant is timed in the same rounds of the same
process (interleaved, median of --repeat), and profiled once (ORT's profiler) for where the time goes:
per op type, and the time of the Cos/Sin/RotaryEmbedding/Gather nodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
OPS = ("tables", "onnx", "ort", "decomposed")
ROPE_OPS = {"Cos", "Sin", "RotaryEmbedding", "Gather"}  # Gather: the tables' and the embedding's (in every variant)


def build(args, folder: Path) -> tuple[Path, Path]:
    import rewrite_models as rm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    rm.export(model, folder / "original.onnx")
    cfg.save_pretrained(folder)
    return folder / "original.onnx", folder / "config.json"


def session(path: Path, threads: int, profile: str | None = None):
    from pe_export.runtimes.ort import ort_session, require_provider

    sess = ort_session(path, "CPUExecutionProvider", threads=threads, profile_prefix=profile)
    require_provider(sess, "CPUExecutionProvider")
    return sess


def where_time_goes(path: Path, feed: dict, threads: int, prefix: str) -> dict:
    """Per op type, the share of the node time of the last of three runs (ORT profiler; the first runs
    plan memory), and the time of Cos, Sin, RotaryEmbedding and Gather nodes (the embedding's Gather is in
    every variant, the tables' in the rewritten ones)."""
    sess = session(path, threads, prefix)
    for _ in range(3):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    last = [ev for ev in trace if ev.get("name") == "model_run"][-1]
    by_type, rope = Counter(), 0.0
    for ev in trace:
        if (
            ev.get("cat") == "Node"
            and ev["name"].endswith("_kernel_time")
            and last["ts"] <= ev["ts"] <= last["ts"] + last["dur"]
        ):
            op = ev["args"].get("op_name", "?")
            by_type[op] += ev["dur"]
            if op in ROPE_OPS:
                rope += ev["dur"]
    total = sum(by_type.values()) or 1
    return {"top": [(k, v / total) for k, v in by_type.most_common(4)], "rope_share": rope / total, "rope_us": rope}


def accuracy(families: list[str], ops=OPS) -> str:
    """The measured table of the README: per family and --op, the logits' max abs error against the float64
    oracle (tests/rewrite_models.py) at positions 0-63 and at the last 64 positions of the table."""
    import rewrite_models as rm

    from pe_export.rewriter import rewrite

    lines = [
        "| family | --op | last position | original 0-63 | original last 64 | rewritten 0-63 | rewritten last 64 | "
        "end / start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="pe-export-rewrite-acc-") as tmp:
        for name in families:
            family = rm.BY_NAME[name]
            folder = Path(tmp) / name
            folder.mkdir()
            model, cfg = rm.build(family)
            original = rm.export(model, folder / "model.onnx")
            config = rm.save_config(cfg, folder)
            m64 = rm.oracle(model, cfg)
            for op in ops:
                out = folder / f"{op}.onnx"
                rewrite(original, config, op=op, output=out)
                e = rm.errors(original, out, m64, family.last)
                lines.append(
                    f"| {name} | {op} | {family.last - 1} | {e['original_start']:.1e} | {e['original_end']:.1e} | "
                    f"{e['rewritten_start']:.1e} | {e['rewritten_end']:.1e} | "
                    f"{e['rewritten_end'] / e['rewritten_start']:.2f} |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode-at", type=int, default=100000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument(
        "--accuracy",
        nargs="*",
        metavar="FAMILY",
        help="Instead: the logits error table of these families (tests/rewrite_models.py; none: all).",
    )
    args = ap.parse_args()
    if args.accuracy is not None:
        import rewrite_models as rm

        text = accuracy(args.accuracy or [f.name for f in rm.FAMILIES])
        if args.output:
            args.output.write_text(text)
        return

    from pe_export.rewriter import rewrite

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="pe-export-rewrite-bench-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        original, config = build(args, folder)
        export_s = time.perf_counter() - t
        paths = {"original": original}
        rewrite_s = {}
        for op in OPS:
            t = time.perf_counter()
            rewrite(original, config, op=op, output=folder / f"{op}.onnx")
            rewrite_s[op] = time.perf_counter() - t
            paths[op] = folder / f"{op}.onnx"
        feeds = {
            f"prefill {args.prefill}": {
                "input_ids": rng.integers(0, 256, (1, args.prefill)),
                "position_ids": np.arange(args.prefill)[None],
            },
            f"decode at {args.decode_at}": {
                "input_ids": rng.integers(0, 256, (1, 1)),
                "position_ids": np.array([[args.decode_at]]),
            },
        }
        sessions = {name: session(p, args.threads) for name, p in paths.items()}
        times = {(case, name): [] for case in feeds for name in paths}
        for case, feed in feeds.items():
            for s in sessions.values():
                s.run(None, feed)  # warm-up
            names = list(sessions)
            for r in range(args.repeat):
                # Interleaved, and the order rotated every round: every variant sees the same load and
                # no variant always runs first (a fixed order measured a steady 4% per place here).
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    t = time.perf_counter()
                    sessions[name].run(None, feed)
                    times[(case, name)].append(time.perf_counter() - t)
        profiles = {
            (case, name): where_time_goes(paths[name], feed, args.threads, str(folder / f"prof-{name}"))
            for case, feed in feeds.items()
            for name in paths
        }

    lines = [
        "# pe-export rewrite on ORT CPU",
        "",
        f"Llama, hidden {args.hidden}, {args.heads} heads, {args.layers} layers, llama3 scaling, 131072 positions; "
        f"{platform.processor() or platform.machine()}, {args.threads} threads, median of {args.repeat}; "
        f"export {export_s:.0f} s, rewrite " + ", ".join(f"{op} {s:.1f} s" for op, s in rewrite_s.items()) + ".",
        "",
        "| case | model | median ms | ratio to original | Cos/Sin/RotaryEmbedding/Gather | top op types (last "
        "profiled run) |",
        "|---|---|---|---|---|---|",
    ]
    for case in feeds:
        base = statistics.median(times[(case, "original")])
        for name in paths:
            med = statistics.median(times[(case, name)])
            prof = profiles[(case, name)]
            top = ", ".join(f"{k} {v:.0%}" for k, v in prof["top"])
            lines.append(
                f"| {case} | {name} | {med * 1e3:.1f} | {med / base:.3f} | {prof['rope_share']:.2%} "
                f"({prof['rope_us'] / 1e3:.2f} ms) | {top} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
