"""IREE: its ONNX importer, compiled for llvm-cpu, run by its runtime (the optional `iree` extra)."""

from __future__ import annotations

import numpy as np

from pe_export.runtimes.graphs import first_output, in_memory
from pe_export.runtimes.outcomes import Skip, Unsupported
from pe_export.spec import Spec

PRELOAD = ("iree.runtime",)  # imported by the worker as it starts (pe_export.runtimes.worker._preload)


def graph_iree(model_bytes: bytes, threads: int | None = None):
    """Import with iree's ONNX importer, compile for llvm-cpu (this host's CPU), run on `local-task`."""
    model_bytes = in_memory(model_bytes)  # a path (a large model): read in, if under 2 GiB
    try:
        import iree.compiler as compiler
        import iree.runtime as rt
    except ImportError:
        raise Skip("iree is not installed (pip install 'pe-export[iree]')") from None
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="pe-export-iree-") as tmp:
        onnx_path, mlir = Path(tmp) / "model.onnx", Path(tmp) / "model.mlir"
        onnx_path.write_bytes(model_bytes)
        done = subprocess.run(
            [sys.executable, "-m", "iree.compiler.tools.import_onnx", str(onnx_path), "-o", str(mlir)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise Unsupported(f"does not import: {_first_error(done.stderr)}")
        try:
            vmfb = compiler.compile_file(
                str(mlir), target_backends=["llvm-cpu"], extra_args=["--iree-llvmcpu-target-cpu=host"]
            )
        except Exception as e:
            raise Unsupported(f"does not compile: {_first_error(str(e))}") from None
    ctx = rt.SystemContext(config=rt.Config("local-task"))
    module = rt.VmModule.copy_buffer(ctx.instance, vmfb)
    ctx.add_vm_module(module)
    name = next(n for n in module.function_names if not n.startswith("__") and "$" not in n)
    function = ctx.modules[module.name][name]

    def run(inputs):
        got = function(*[np.ascontiguousarray(v) for v in inputs.values()])
        return [np.asarray(v) for v in (got if isinstance(got, (tuple, list)) else [got])]

    import iree.compiler.version as version

    return run, f"IREE {getattr(version, 'VERSION', '')} llvm-cpu (local-task)".replace("  ", " ")


def run_iree(spec: Spec, model_bytes: bytes, threads: int | None = None):
    if spec.dtype == "bf16":
        raise Skip("not tried: NumPy bfloat16 arrays into iree's runtime")
    run, provider = graph_iree(model_bytes, threads)
    return first_output(run), provider


def _first_error(text: str) -> str:
    """The first line of a compiler's output that says `error:`, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = next((line for line in lines if "error:" in line), lines[-1] if lines else "no message")
    return found.split("error:", 1)[-1].split(": %")[0].strip()[:200]  # the message, not the IR it quotes
