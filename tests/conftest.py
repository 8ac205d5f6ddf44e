"""Shared test helpers: a cached exporter (exports are the slow part) and ONNX Runtime sessions."""

import functools

import pytest

from pe_export.spec import Spec


@functools.lru_cache(maxsize=None)
def _build_bytes(spec_json: str) -> bytes:
    from pe_export.onnx_export import build

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


def assert_verified(spec: Spec) -> dict:
    """verify.check on torch, ORT CPU (graph optimisations on and off) and onnx's evaluator: nothing
    fails, the torch original and the evaluator pass, ORT CPU passes on CPU both ways (bf16: or is
    skipped for want of a bf16 kernel), verdict pass."""
    from pe_export.parity import check, verdict

    rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=("torch", "ort-cpu", "ort-cpu-noopt", "onnx-reference"))}
    failures = [f"{r.runtime}: {r.note}" for r in rows.values() if r.verdict == "FAIL"]
    assert not failures, failures
    assert rows["torch"].verdict == rows["onnx-reference"].verdict == "pass"
    for ort in ("ort-cpu", "ort-cpu-noopt"):
        if spec.dtype == "bf16" and rows[ort].verdict == "skipped":  # ORT CPU lacks most bf16 kernels
            assert "no kernel" in rows[ort].note, rows[ort]
        else:
            assert rows[ort].verdict == "pass" and rows[ort].provider.startswith("CPUExecutionProvider")
    assert verdict(list(rows.values())) == "pass"
    return rows
