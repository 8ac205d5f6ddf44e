"""`pe-export rewrite` at real size (issue 19): Llama-shaped exports of about 0.1B, 0.5B and 1.2B
parameters (fp32) and one fp16, each rewritten alone and rewritten + verified on the default runtimes
(ort-cpu, ort-cpu-noopt), each as a process of its own. Reported for each: wall time as a ratio to `cp`
of the same files (model.onnx and model.onnx.data, timed in the same run: the I/O limit), and the peak
resident memory of the whole process tree (pe-export and its runtime workers, sampled every 20 ms from
/proc) as a ratio to the model's bytes. Aims: rewrite alone <= 2x cp and <= 0.25x model bytes;
rewrite + verification <= 6x cp and <= 1.5x model bytes, every row verified.

    python benchmarks/realsize.py [--sizes 0.1B,0.5B,1.2B,0.1B-fp16] [--folder DIR] [--keep] [--rounds N]
        [--output FILE.md]

With --rounds N each size is measured N times in a row (cp, rewrite, rewrite + verify: each ratio within
its round) and the table gives the medians: on a machine shared with other work one round can be twice
another.

The models: transformers 5.23 `LlamaForCausalLM` with random weights (nothing downloaded), llama3
scaling x32, theta 5e5, 131072 positions (Llama-3.2's rope parameters), inputs (input_ids, position_ids)
-> logits, exported by torch.onnx.export(dynamo=True) with every weight in external data (as a real
model over 2 GiB must be). 1.2B is Llama-3.2-1B's shape (1.24B parameters, tied embeddings). Each is
built in a process of its own, once; the folder is removed at the end unless --keep. Building the
1.2B model takes ~7 GiB of memory for minutes: the benchmark refuses to build a model with less than
BUILD_NEEDS times its bytes available (MemAvailable) and says so in its row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SIZES = {  # name: (LlamaConfig sizes, dtype)
    "0.1B": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000), "float32"),
    "0.5B": (dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=64000), "float32"),
    "1.2B": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=128256), "float32"),
    "0.1B-fp16": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000), "float16"),
}  # fmt: skip
BUILD_NEEDS = 2.5  # MemAvailable needed to build, in model bytes (measured: the exporter's peak, 1.4x at 0.5B)


def build(name: str, folder: Path) -> None:
    """Export the `name` model to folder/model.onnx (+ model.onnx.data) and folder/config.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes, dtype = SIZES[name]
    cfg = LlamaConfig(**sizes, max_position_embeddings=131072, rope_parameters=ROPE, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    model.to(getattr(torch, dtype))
    # As from_pretrained(dtype=float16) leaves it: the rotary inv_freq stays float32 (`.to` would round
    # it to float16, a graph whose theta then disagrees with the config: the rewrite refuses it).
    rotary.inv_freq = rotary.original_inv_freq = inv_freq

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, position_ids):
            return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    ids, pos = torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None]
    with torch.no_grad():
        program = torch.onnx.export(
            Logits(model),
            (ids, pos),
            dynamo=True,
            input_names=["input_ids", "position_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: "B", 1: "S"}, "position_ids": {0: "B", 1: "S"}},
            verbose=False,
            external_data=True,
        )
        program.save(str(folder / "model.onnx"), external_data=True)
    cfg.save_pretrained(folder)
    (folder / "parameters.json").write_text(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def measured(cmd: list[str]) -> dict:
    """Run `cmd`; its wall time, the peak resident memory of its process tree, return code, output tail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out = proc.communicate()[0]
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    return {"wall_s": wall, "peak_bytes": peak[0], "rc": proc.returncode, "tail": out[-3000:]}


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*"))


def cp_time(folder: Path) -> float:
    dst = folder / "cp"
    dst.mkdir()
    t = time.perf_counter()
    subprocess.run(["cp", str(folder / "model.onnx"), str(folder / "model.onnx.data"), str(dst)], check=True)
    os.sync()
    wall = time.perf_counter() - t
    shutil.rmtree(dst)
    return wall


def available() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def bench(name: str, root: Path, rounds: int = 1) -> dict:
    folder = root / name
    folder.mkdir(exist_ok=True)
    row = {"size": name, "dtype": SIZES[name][1]}
    if not (folder / "model.onnx").exists():
        sizes, dtype = SIZES[name]
        need = BUILD_NEEDS * estimate_bytes(sizes, dtype)
        if available() < need:
            return {**row, "note": f"not built: {available() / 2**30:.1f} GiB available, {need / 2**30:.1f} needed"}
        b = measured([sys.executable, __file__, "--build", name, "--folder", str(folder)])
        if b["rc"] != 0:
            return {**row, "note": f"build failed: {b['tail'][-500:]}"}
        row["build_s"], row["build_peak_bytes"] = b["wall_s"], b["peak_bytes"]
    if (folder / "parameters.json").exists():  # also for a model built by an earlier run (--folder)
        row["parameters"] = json.loads((folder / "parameters.json").read_text())["parameters"]
    row["model_bytes"] = model_bytes(folder)
    runs = [one_round(folder) for _ in range(rounds)]
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    row.update(
        rounds=rounds,
        cp_s=median("cp_s"),
        rewrite_s=median("rewrite_s"),
        rewrite_x_cp=statistics.median(r["rewrite_s"] / r["cp_s"] for r in runs),  # each ratio within its round
        rewrite_peak_bytes=max(r["rewrite_peak_bytes"] for r in runs),
        verified_s=median("verified_s"),
        verified_x_cp=statistics.median(r["verified_s"] / r["cp_s"] for r in runs),
        verified_peak_bytes=max(r["verified_peak_bytes"] for r in runs),
        verified_rc=max(r["verified_rc"] for r in runs),
        rows=max(r["rows"] for r in runs),
        rows_pass=min(r["rows_pass"] for r in runs),
        row_notes=sorted({n for r in runs for n in r["row_notes"]}),
        each_round=runs,
    )
    return row


def one_round(folder: Path) -> dict:
    """cp, then the rewrite alone, then the rewrite + verification, of the model in `folder`."""
    got = {"cp_s": cp_time(folder)}
    model, config, out = folder / "model.onnx", folder / "config.json", folder / "r.onnx"
    alone = measured(
        [sys.executable, "-c", "import sys; from pe_export.rewriter import rewrite; "
         "rewrite(sys.argv[1], sys.argv[2], output=sys.argv[3])", str(model), str(config), str(out)]
    )  # fmt: skip
    if alone["rc"] != 0:
        got["rewrite_error"] = alone["tail"][-800:]
    for f in folder.glob("r.onnx*"):
        f.unlink()
    os.sync()
    report = folder / "report.json"
    verified = measured(
        [sys.executable, "-c", "from pe_export.cli.main import run; run()", "rewrite", str(model), "--config",
         str(config), "-o", str(out), "--report", str(report)]
    )  # fmt: skip
    rows = []
    if report.exists():
        doc = json.loads(report.read_text())
        rows = [*doc.get("sites", []), *doc.get("whole_model", [])]
    for f in [*folder.glob("r.onnx*"), report]:
        f.unlink(missing_ok=True)
    os.sync()
    got.update(
        rewrite_s=alone["wall_s"],
        rewrite_peak_bytes=alone["peak_bytes"],
        verified_s=verified["wall_s"],
        verified_peak_bytes=verified["peak_bytes"],
        verified_rc=verified["rc"],
        rows=len(rows),
        rows_pass=sum(r["verdict"] == "pass" for r in rows),
        row_notes=sorted({f"{r['runtime']}: {r['verdict']} {r.get('note', '')}".strip() for r in rows}),
    )
    if verified["rc"] != 0:
        got["verified_tail"] = verified["tail"][-1500:]
    return got


def estimate_bytes(sizes: dict, dtype: str) -> int:
    h, i, n, v = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"], sizes["vocab_size"]
    kv = sizes["num_key_value_heads"] * sizes.get("head_dim", h // sizes["num_attention_heads"])
    params = v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    return params * (2 if dtype == "float16" else 4)


def table(rows: list[dict]) -> str:
    head = (
        "| size | dtype | parameters | model bytes | cp | rewrite | x cp | peak | x model | rewrite + verify | x cp "
        "| peak | x model | rows verified | exit |\n|" + "---|" * 15
    )
    lines = [head]
    for r in rows:
        if "model_bytes" not in r:
            lines.append(f"| {r['size']} | {r['dtype']} | {r.get('note', '')} |" + " |" * 12)
            continue
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        mb = r["model_bytes"]
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r.get('parameters', 0) / 1e9:.3f}B | {gib(mb)} | {r['cp_s']:.1f} s "
            f"| {r['rewrite_s']:.1f} s | {r['rewrite_x_cp']:.2f} | {gib(r['rewrite_peak_bytes'])} "
            f"| {r['rewrite_peak_bytes'] / mb:.2f} | {r['verified_s']:.1f} s | {r['verified_x_cp']:.2f} "
            f"| {gib(r['verified_peak_bytes'])} | {r['verified_peak_bytes'] / mb:.2f} "
            f"| {r['rows_pass']}/{r['rows']} | {r['verified_rc']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1B,0.5B,1.2B,0.1B-fp16")
    ap.add_argument("--folder", type=Path, default=None, help="where the models are built (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the built models")
    ap.add_argument("--output", type=Path, default=None, help="also write the table (and rows as JSON) here")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per size (cp, rewrite, rewrite + verify): medians")
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)  # the build subprocess
    args = ap.parse_args()
    if args.build:
        build(args.build, args.folder)
        return
    root = args.folder or Path(tempfile.mkdtemp(prefix="pe-export-realsize-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in args.sizes.split(","):
            rows.append(bench(name, root, args.rounds))
            print(json.dumps(rows[-1]), flush=True)
            if not args.keep:
                shutil.rmtree(root / name, ignore_errors=True)
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(root, ignore_errors=True)
    import onnxruntime
    import torch
    import transformers

    text = (
        f"{platform.machine()}, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
        f"median of {args.rounds} round(s) (each ratio within its round; peaks: the largest), "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
        f"\n\n{table(rows)}\n"
    )
    print(text)
    if args.output:
        args.output.write_text(text + "\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
