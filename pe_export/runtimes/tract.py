"""tract, Sonos' Rust runtime, on CPU through its Python package (the optional `tract` extra)."""

from __future__ import annotations

import numpy as np

from pe_export.errors import one_line
from pe_export.runtimes.graphs import custom_domains, first_output
from pe_export.runtimes.outcomes import Skip, Unsupported
from pe_export.spec import Spec

PRELOAD = ("tract",)  # imported by the worker as it starts (pe_export.runtimes.worker._preload)


def graph_tract(model, threads: int | None = None):
    """tract from its Python package, `model` bytes or a path; `threads` is accepted for bench and not
    used (tract's Python API sets no thread count: it runs the graph on its own executor). The inputs go
    in the graph's order."""
    try:
        import tract
    except ImportError:
        raise Skip("tract is not installed (pip install 'pe-export[tract]')") from None
    domains = custom_domains(model)
    if domains:
        raise Unsupported(f"cannot load: tract has no ops of domain {', '.join(domains)}")
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:  # tract loads from a path only
        if isinstance(model, bytes):
            f.write(model)
            f.flush()
        try:
            model = tract.onnx().load(f.name if isinstance(model, bytes) else str(model)).into_model().into_runnable()
        except Exception as e:
            raise Unsupported(f"cannot load: {one_line(e)}") from None

    def run(inputs):
        return [t.to_numpy() for t in model.run(list(inputs.values()))]

    def time(inputs, repeat):  # tract's own run, on tensors converted once
        import time as clock

        tensors = [tract.Tensor.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()]
        times = []
        for _ in range(repeat):
            t = clock.perf_counter()
            model.run(tensors)
            times.append(clock.perf_counter() - t)
        return times

    run.time = time
    return run, f"tract {tract.version()} CPU"


def run_tract(spec: Spec, model_bytes: bytes, threads: int | None = None):
    if spec.dtype == "bf16":
        raise Skip("tract's Python API takes no NumPy bfloat16 arrays")
    run, provider = graph_tract(model_bytes, threads)
    return first_output(run), provider
