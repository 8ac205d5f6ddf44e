"""onnx's ReferenceEvaluator: an independent implementation of the standard ops."""

from __future__ import annotations

import numpy as np

from pe_export.runtimes.graphs import all_nodes, first_output
from pe_export.runtimes.outcomes import Skip
from pe_export.spec import Spec

PRELOAD = ("onnx.reference",)  # imported by the worker as it starts (pe_export.runtimes.worker._preload)


def reference_evaluator(model):
    """onnx's ReferenceEvaluator for the model, or Skip when a node uses a domain it has no ops for
    (the domains nodes use, not those opset_import lists: ORT's optimised files import nine)."""
    from onnx.reference import ReferenceEvaluator

    custom = sorted({n.domain for n in all_nodes(model.graph) if n.domain not in ("", "ai.onnx")})
    if custom:
        raise Skip(f"onnx's ReferenceEvaluator has no ops of domain {', '.join(custom)}")
    return ReferenceEvaluator(model)


def graph_onnx_reference(model):
    """`model` as bytes or a path (its external data read from beside it)."""
    import onnx

    ev = reference_evaluator(onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model)))
    return (lambda inputs: [np.asarray(v) for v in ev.run(None, inputs)]), "ReferenceEvaluator"


def run_onnx_reference(spec: Spec, model_bytes: bytes):
    run, provider = graph_onnx_reference(model_bytes)
    return first_output(run), provider
