"""Parity of an exported graph with the float64 reference, on every runtime that can run it.

One tolerance table, one comparison helper. Each output element gets its own bound,

    factor * (eps(dtype) * magnitude + denorm_min(dtype)),

where `magnitude` comes from the encoding (for RoPE: `attention_factor * (|a| + |b|)` for the pair
(a, b) the element belongs to, `|x|` on the pass-through tail). It bounds the rounding error of a
correct implementation in that dtype; it is not a number tuned to make a run pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pe_export.encodings import encoding_for
from pe_export.spec import Spec, numpy_dtype

EPS = {"fp32": 2.0**-23, "fp16": 2.0**-10, "bf16": 2.0**-7}  # machine epsilon
DENORM_MIN = {"fp32": 2.0**-149, "fp16": 2.0**-24, "bf16": 2.0**-133}  # spacing of the subnormals


@dataclass(frozen=True)
class Tolerance:
    factor: float
    reason: str


# (dtype, op target) -> bound; "*" matches any target. The same table serves the tests, the export
# check and `pe-export verify`.
_ROUNDING = (
    "an output a*c - b*s (or b*c + a*s) rounds the tables, the two products and the sum, each by at most "
    "eps/2 relative: at most 1.5 eps * F * (|a| + |b|) to first order, bounded here by 2; results in the "
    "subnormal range add at most half a subnormal spacing per operation"
)
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("fp32", "*"): Tolerance(2.0, _ROUNDING),
    ("fp16", "*"): Tolerance(2.0, _ROUNDING + "; kernels that compute in fp32 inside land well under it"),
    ("bf16", "*"): Tolerance(2.0, _ROUNDING + "; bf16 keeps 8 significant bits, so eps = 2^-7"),
}


def tolerance(dtype: str, op: str) -> Tolerance:
    return TOLERANCES.get((dtype, op)) or TOLERANCES[(dtype, "*")]


@dataclass
class Row:
    runtime: str
    provider: str
    dtype: str
    verdict: str  # "pass", "FAIL" or "skipped"
    max_abs: float | None = None  # over all probes and elements
    max_rel: float | None = None  # max abs error / max |reference|, over all probes
    # The element whose error is largest relative to its own bound: its error, bound and place.
    worst_error: float | None = None
    worst_tolerance: float | None = None
    worst_ratio: float | None = None  # worst_error / worst_tolerance; the row fails above 1
    where: str = ""
    note: str = ""
    probes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Runtimes: each takes the model bytes and returns a callable inputs -> output, plus the provider
# that actually runs it; `Skip` says why one cannot run here.


class Skip(Exception):
    pass


def run_torch(spec: Spec, model_bytes: bytes):
    import torch

    module = encoding_for(spec).module(spec)

    def call(inputs):
        args = [to_torch(v) for v in inputs.values()]
        with torch.no_grad():
            y = module(*args)
        return y.to(torch.float64).numpy()

    return call, "eager (CPU)"


def to_torch(a: np.ndarray):
    import torch

    if a.dtype == numpy_dtype("bf16"):  # NumPy has no bfloat16 of its own: go through the bits
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _ort_session(model_bytes: bytes, provider: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install 'pe-export[cpu]' or 'pe-export[gpu]')") from None
    if provider not in ort.get_available_providers():
        raise Skip(f"{provider} not available in this onnxruntime build")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4  # failures come back as exceptions, not log lines
    try:
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        sess = ort.InferenceSession(model_bytes, opts, providers=providers)
    except Exception as e:
        if "NOT_IMPLEMENTED" in str(e):
            raise Skip(f"no kernel in this onnxruntime: {str(e).split(':')[-1].strip()}") from None
        raise
    return sess


def _ort_run(sess, spec: Spec):
    if spec.dtype == "bf16":
        # The session may load (ORT has some bf16 kernels), but its Python API cannot hand bf16 arrays in or out.
        raise Skip("onnxruntime's Python API cannot pass bfloat16 tensors")
    return lambda inputs: sess.run(None, inputs)[0].astype(np.float64)


def run_ort_cpu(spec: Spec, model_bytes: bytes):
    sess = _ort_session(model_bytes, "CPUExecutionProvider")
    return _ort_run(sess, spec), sess.get_providers()[0]


def run_ort_cuda(spec: Spec, model_bytes: bytes):
    sess = _ort_session(model_bytes, "CUDAExecutionProvider")
    ran = sess.get_providers()[0]
    if ran != "CUDAExecutionProvider":  # ORT falls back to CPU silently: that is a failure here
        raise RuntimeError(f"asked for CUDAExecutionProvider but the session runs on {ran}")
    return _ort_run(sess, spec), ran


def run_onnx_reference(spec: Spec, model_bytes: bytes):
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load_from_string(model_bytes)
    custom = sorted({o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")})
    if custom:
        raise Skip(f"onnx's ReferenceEvaluator has no ops of domain {', '.join(custom)}")
    ev = ReferenceEvaluator(model)
    return (lambda inputs: np.asarray(ev.run(None, inputs)[0]).astype(np.float64)), "ReferenceEvaluator"


RUNTIMES = {
    "torch": run_torch,
    "ort-cpu": run_ort_cpu,
    "ort-cuda": run_ort_cuda,
    "onnx-reference": run_onnx_reference,
}
DEFAULT_RUNTIMES = ("torch", "ort-cpu", "ort-cuda", "onnx-reference")


def bound(spec: Spec, inputs: dict) -> np.ndarray:
    """The per-element error bound of the output for `inputs`: factor * (eps * magnitude + denorm_min)."""
    magnitude = encoding_for(spec).magnitude(spec, inputs)
    return tolerance(spec.dtype, spec.op).factor * (EPS[spec.dtype] * magnitude + DENORM_MIN[spec.dtype])


def check(spec: Spec, model_bytes: bytes, runtimes=DEFAULT_RUNTIMES, seed: int = 0, batch: int = 2) -> list[Row]:
    """Run every probe on every runtime and compare with the float64 reference."""
    enc = encoding_for(spec)
    probes = enc.probes(spec, np.random.default_rng(seed), batch)
    truths = [enc.reference(spec, inputs) for _, inputs in probes]
    bounds = [bound(spec, inputs) for _, inputs in probes]
    rows = []
    for name in runtimes:
        row = Row(runtime=name, provider="", dtype=spec.dtype, verdict="pass", probes=[p for p, _ in probes])
        try:
            call, row.provider = RUNTIMES[name](spec, model_bytes)
            for (probe, inputs), truth, limit in zip(probes, truths, bounds):
                got = call(inputs)
                if got.shape != truth.shape:
                    raise RuntimeError(f"probe {probe}: output shape {got.shape}, want {truth.shape}")
                # Equal infinities (a mask's -inf) are exact; any other NaN or inf error fails below.
                with np.errstate(invalid="ignore"):
                    err = np.where(got == truth, 0.0, np.abs(got - truth))
                ratio = np.where(np.isfinite(err), err / limit, np.inf)
                at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
                row.max_abs = max(row.max_abs or 0.0, float(np.max(err)))
                finite = np.abs(truth[np.isfinite(truth)])
                row.max_rel = max(row.max_rel or 0.0, float(np.max(err)) / max(float(finite.max(initial=0.0)), 1e-300))
                if row.worst_ratio is None or ratio[at] > row.worst_ratio:
                    row.worst_ratio, row.worst_error, row.worst_tolerance = float(ratio[at]), float(err[at]), float(limit[at])
                    row.where = f"{probe}: " + enc.locate(spec, inputs, at)
            if row.worst_ratio > 1.0:
                row.verdict = "FAIL"
                row.note = f"error {row.worst_error:.3g} over its bound {row.worst_tolerance:.3g} at {row.where}"
        except Skip as e:
            row.verdict, row.note = "skipped", str(e)
        except Exception as e:  # a runtime that errors on a valid input is a failed row, with its message
            row.verdict, row.note = "FAIL", " ".join(str(e).split())[:300]
        rows.append(row)
    return rows


def verdict(rows: list[Row]) -> str:
    """'pass' when nothing failed and some ONNX runtime passed; 'FAIL' or 'unverified' otherwise."""
    if any(r.verdict == "FAIL" for r in rows):
        return "FAIL"
    if not any(r.verdict == "pass" and r.runtime != "torch" for r in rows):
        return "unverified"
    return "pass"

