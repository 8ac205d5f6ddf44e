"""Shared test helpers: a cached exporter (exports are the slow part) and ONNX Runtime sessions."""

import functools
import os

# The CLI sizes its tables to the terminal; the tests read their cells, so give them one width wherever
# they run (a narrow terminal, CI's pipe, or a pytest-xdist worker whose stdout is no terminal).
os.environ["COLUMNS"] = "200"

import pytest

from pe_export.spec import Spec


@functools.cache
def _build_bytes(spec_json: str) -> bytes:
    from pe_export.pipeline.onnx_export import build

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
    from pe_export.verification.parity import check, verdict

    rows = {
        r.runtime: r
        for r in check(spec, exported(spec), runtimes=("torch", "ort-cpu", "ort-cpu-noopt", "onnx-reference"))
    }
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


def assert_within_ulps(actual, expected, ulps: float, why: str, scale=None) -> None:
    """actual and expected have one shape and dtype and differ by at most `ulps` units in the last place:
    |actual - expected| <= ulps * spacing(scale), elementwise, with scale the larger of |actual| and
    |expected| unless given (equal values, infinities and NaN included, are 0 apart). For values that go
    through BLAS (matmul, einsum, attention): it picks other kernels (summation orders, FMA or not) for
    other shapes and CPUs, so one float64 dot product computed over two shapes can differ in its last
    bits. Pass `scale` (broadcastable) for sums that cancel: a sum's rounding follows the magnitude of its
    terms, not of its result. `why` states where `ulps` comes from; a failure prints it with the largest
    distance, where it is, and how many elements differ."""
    import numpy as np

    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"dtypes differ: {actual.dtype} vs {expected.dtype}"
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    if scale is None:
        scale = np.maximum(np.abs(a), np.abs(e))
    step = np.spacing(np.broadcast_to(np.abs(scale), a.shape).astype(actual.dtype)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.nan_to_num(np.abs(a - e) / step, nan=np.inf))  # NaN on one side only: inf
    if d.size and d.max() > ulps:
        at = tuple(int(i) for i in np.unravel_index(int(np.argmax(d)), d.shape))
        raise AssertionError(
            f"{d.max():.3g} ulps apart at {at} ({actual[at]!r} vs {expected[at]!r}), allowed {ulps}: {why}; "
            f"{int((d > ulps).sum())} of {d.size} elements over, {int((~same).sum())} not identical"
        )
