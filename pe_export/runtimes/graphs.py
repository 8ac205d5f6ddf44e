"""Helpers shared by the adapters: the first output as float64, every node of a graph, what a graph holds,
and a model given as bytes or as a path (a file whose external data lies beside it: large models are
given so, never as a protobuf of all their weights)."""

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


def graph_of(model):
    """The onnx.ModelProto of `model` (bytes, or a path: its external data left on disk)."""
    import onnx

    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model), load_external_data=False)


def in_memory(model) -> bytes:
    """`model` as bytes, for a runtime that takes no path: a path's file with its external data read in
    (`Unsupported` past the 2 GiB one protobuf holds)."""
    if isinstance(model, bytes):
        return model
    import onnx

    from pe_export.runtimes.outcomes import Unsupported

    proto = onnx.load(str(model))
    if proto.ByteSize() > 2**31 - 1:
        raise Unsupported("cannot load: this runtime takes a model as bytes, and its weights exceed 2 GiB")
    return proto.SerializeToString()


def custom_domains(model) -> list[str]:
    return sorted({n.domain for n in all_nodes(graph_of(model).graph) if n.domain not in ("", "ai.onnx")})


def computes_in_float64(model) -> bool:
    """True when the graph holds float64 constants or casts to float64."""
    from onnx import TensorProto

    graph = graph_of(model).graph
    casts = (a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
    return TensorProto.DOUBLE in casts or any(t.data_type == TensorProto.DOUBLE for t in graph.initializer)
