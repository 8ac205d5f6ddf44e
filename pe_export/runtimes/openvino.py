"""OpenVINO's ONNX frontend on CPU, in float32 (the optional `openvino` extra)."""

from __future__ import annotations

import io

import numpy as np

from pe_export.runtimes.graphs import computes_in_float64, first_output
from pe_export.runtimes.outcomes import Skip
from pe_export.spec import Spec

PRELOAD = ("openvino",)  # imported by the worker as it starts (pe_export.runtimes.worker._preload)


def graph_openvino(model):
    """`model` as bytes or a path (its external data read from beside it)."""
    try:
        import openvino as ov
    except ImportError:
        raise Skip("openvino is not installed (pip install 'pe-export[openvino]')") from None
    core = ov.Core()
    graph = core.read_model(io.BytesIO(model) if isinstance(model, bytes) else str(model))
    # f32: on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise run float32 graphs in bf16.
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    name = f"OpenVINO {ov.__version__.split('-')[0]} CPU"
    if computes_in_float64(model):  # its CPU plugin has no float64 kernels (dynamic NTK's in-graph angles)
        name += ", float64 math run in float32"

    def run(inputs):
        got = compiled(inputs)
        return [np.asarray(got[out]) for out in compiled.outputs]

    return run, name


def run_openvino(spec: Spec, model_bytes: bytes):
    if spec.dtype == "bf16":
        raise Skip("OpenVINO's Python API takes no NumPy bfloat16 arrays")
    run, provider = graph_openvino(model_bytes)
    return first_output(run), provider
