"""How fast the main command starts and finishes, as ratios against limits measured in the same run.

The main command, `pe-export llama-rope --seq 8192` (export, onnx's checker, verification on the
default runtimes), against the bare import of what it cannot do without:
`python -c "import torch, onnx, onnxruntime, onnxscript"`; and `pe-export --help` against
`python -c pass`. The commands alternate, N rounds, and each ratio is of the medians, so a load on the
(shared) machine moves both sides. Prints a Markdown table with the machine and versions.

    python benchmarks/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE_IMPORT = [sys.executable, "-c", "import torch, onnx, onnxruntime, onnxscript"]
BARE_PYTHON = [sys.executable, "-c", "pass"]


def pe_export(*args: str) -> list[str]:
    found = shutil.which("pe-export")
    return [found, *args] if found else [sys.executable, "-m", "pe_export.cli.main", *args]


def seconds(command: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def machine() -> str:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return (
        f"{cpu}, {len(__import__('os').sched_getaffinity(0))} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"onnxscript {onnxscript.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    pairs = {
        "main command": (pe_export("llama-rope", "--seq", "8192", "-o", "l.onnx", "--force"), BARE_IMPORT),
        "--help": (pe_export("--help"), BARE_PYTHON),
    }
    times = {name: ([], []) for name in pairs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (command, limit) in pairs.items():
                times[name][1].append(seconds(limit, Path(tmp)))
                times[name][0].append(seconds(command, Path(tmp)))
    print(f"Measured on {machine()}; {args.rounds} alternating rounds, medians.\n")
    print("| command | median s | limit | limit median s | ratio |")
    print("|---|---|---|---|---|")
    for name, (command, limit) in pairs.items():
        got, bound = statistics.median(times[name][0]), statistics.median(times[name][1])
        shown = " ".join(Path(command[0]).name if i == 0 else c for i, c in enumerate(command))
        print(f"| `{shown}` | {got:.2f} | `{' '.join(limit[1:])}` | {bound:.2f} | {got / bound:.2f}x |")


if __name__ == "__main__":
    main()
