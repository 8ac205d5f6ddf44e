"""Helpers shared by the adapters: the first output as float64, every node of a graph, what a graph holds."""

from __future__ import annotations

import numpy as np


def first_output(run):
    """A Spec adapter's `call` over a graph adapter's `run`: the first output as float64 (`run.time`,
    an adapter's own timing, kept)."""

    def call(inputs):
        return np.asarray(run(inputs)[0]).astype(np.float64)

    if hasattr(run, "time"):
        call.time = run.time
    return call


def all_nodes(graph):
    """Every node of the graph, those inside control-flow subgraphs (If, Loop, Scan) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from all_nodes(sub)


def custom_domains(model_bytes: bytes) -> list[str]:
    import onnx

    return sorted(
        {n.domain for n in all_nodes(onnx.load_from_string(model_bytes).graph) if n.domain not in ("", "ai.onnx")}
    )


def computes_in_float64(model_bytes: bytes) -> bool:
    """True when the graph holds float64 constants or casts to float64."""
    import onnx
    from onnx import TensorProto

    graph = onnx.load_from_string(model_bytes).graph
    casts = (a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
    return TensorProto.DOUBLE in casts or any(t.data_type == TensorProto.DOUBLE for t in graph.initializer)
