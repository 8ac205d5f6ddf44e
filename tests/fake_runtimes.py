"""Runtime adapters that misbehave on purpose, for tests of pe_export.runtimes.worker and verify.

They are module-level functions so that a worker process can import them (adapters travel to their
worker by reference); tests register them with monkeypatch.setitem(RUNTIMES, name, adapter).
"""

import os
import time

import numpy as np


def aborts(spec, model_bytes):
    """Loads, then aborts its process on the first call (as tract on a position past its table)."""

    def call(inputs):
        os.write(2, b"fake runtime: about to abort\n")
        os.abort()

    return call, "aborts"


def aborts_on_load(spec, model_bytes):
    os.abort()


def hangs(spec, model_bytes):
    def call(inputs):
        time.sleep(3600)

    return call, "hangs"


def lenient(spec, model_bytes):
    """Never checks its indices (as OpenVINO's Gather, which returns zeros)."""
    return (lambda inputs: np.zeros(1)), "lenient"


def broken(spec, model_bytes):
    """The float64 reference in float32, NaN at position 5 and -inf at position 2."""
    from pe_export.encodings.attention import encoding_for

    def call(inputs):
        got = encoding_for(spec).reference(spec, inputs).astype(np.float32)  # (B, S, 2)
        ids = inputs["position_ids"]
        got[ids == 5] = np.nan
        got[ids == 2] = -np.inf
        return got

    return call, "broken"


def aborts_out_of_range(spec, model_bytes):
    """ONNX Runtime CPU, except that a position outside the table aborts the process."""
    from pe_export.encodings.attention import encoding_for
    from pe_export.runtimes.ort import run_ort_cpu

    real, provider = run_ort_cpu(spec, model_bytes)
    P = encoding_for(spec).params(**spec.params).max_positions

    def call(inputs):
        ids = [v for k, v in inputs.items() if k.endswith(("position_ids", "positions"))]
        if any(((v < 0) | (v >= P)).any() for v in ids):
            os.abort()
        return real(inputs)

    return call, provider


def aborts_graph(model_bytes):
    """A graph adapter (pe_export.runtimes.GRAPH_RUNTIMES) that loads, then aborts its process on the first call."""
    return aborts(None, model_bytes)


def aborts_on_load_graph(model_bytes):
    """A graph adapter that aborts its process while loading."""
    os.abort()


def hangs_graph(model_bytes):
    """A graph adapter that loads, then never answers."""
    return hangs(None, model_bytes)


def skips_graph(model_bytes):
    """A graph adapter whose runtime is not here."""
    from pe_export.runtimes.outcomes import Skip

    raise Skip("not here (fake)")


def no_cos_graph(model):
    """A graph adapter that cannot run a graph with a Cos node (the original's cos/sin computation), and
    runs any other on ONNX Runtime CPU without graph optimisation: bytes or a path."""
    import onnx

    from pe_export.runtimes.ort import graph_ort_cpu_noopt
    from pe_export.runtimes.outcomes import Unsupported

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    if any(n.op_type == "Cos" for n in proto.graph.node):
        raise Unsupported("no Cos here (fake)")
    return graph_ort_cpu_noopt(model)
