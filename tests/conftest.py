"""Shared test helpers: a cached exporter (exports are the slow part) and ONNX Runtime sessions."""

import functools

import pytest

from pe_export.spec import Spec


@functools.lru_cache(maxsize=None)
def _build_bytes(spec_json: str) -> bytes:
    from pe_export.export import build

    return build(Spec.from_json(spec_json)).SerializeToString()


def exported(spec: Spec) -> bytes:
    """The serialized model for `spec`, exported once per test session."""
    return _build_bytes(spec.to_json())


def ort_cpu_session(data: bytes):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def rope_spec(op="onnx", dtype="fp32", layout="bhsd", **params) -> Spec:
    from pe_export.custom_ops.lowerings import OP_TARGETS

    params = {"head_dim": 64, "theta": 10000.0, "max_positions": 256, **params}
    return Spec(encoding="rope", params=params, op=op, opset=OP_TARGETS[op].min_opset, dtype=dtype, layout=layout)
