"""ONNX Runtime: ort-cpu (graph optimisations on), ort-cpu-noopt (off) and ort-cuda, through the one
session helper (`ort_session`) every caller uses; a session that lands on another provider than
the one asked for is a failure (`require_provider`)."""

from __future__ import annotations

import numpy as np

from pe_export.dtypes import numpy_dtype
from pe_export.runtimes.outcomes import Skip
from pe_export.spec import Spec

LEVELS = {True: "ORT_ENABLE_ALL", False: "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED",
          "basic": "ORT_ENABLE_BASIC"}  # fmt: skip

PRELOAD = ("onnxruntime",)  # imported by the worker as it starts (pe_export.runtimes.worker._preload)


def ort_session(
    model,
    provider: str,
    options: dict | None = None,
    optimize: bool | str = True,
    *,
    threads: int | None = None,
    profile_prefix: str | None = None,
    optimized_path: str | None = None,
    prepack: bool = True,
    spin: bool = True,
):
    """The one ONNX Runtime session helper: `model` as bytes or a path (external data beside it is read
    from there), on `provider` with CPU as the fallback ORT wants (`require_provider` checks what ran);
    `optimize` True (ORT's default, all), False (none) or a level name; `threads` intra-op threads (one
    inter-op); `optimized_path` writes ORT's optimised graph there. Skip when ORT or the provider is absent
    or ORT has no kernel for a node. `prepack` False switches off ORT's weight prepacking (a packed copy
    of each MatMul weight made at load: most of a large model's load time and memory, measured in
    docs/large-models.md). `spin` False lets ORT's idle threads sleep instead of spinning (ORT's default):
    the same kernels on the same split of the work, without taking the cores that work beside it needs
    (the rewrite's copy of a large model's weights)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install 'pe-export[cpu]' or 'pe-export[gpu]')") from None
    if provider not in ort.get_available_providers():
        raise Skip(
            f"{provider} is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[optimize])
    opts.log_severity_level = 4  # failures come back as exceptions, not log lines
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    model = model if isinstance(model, bytes) else str(model)
    try:
        providers = (
            [provider] if provider == "CPUExecutionProvider" else [(provider, options or {}), "CPUExecutionProvider"]
        )
        return ort.InferenceSession(model, opts, providers=providers)
    except Exception as e:
        if "NOT_IMPLEMENTED" in str(e):
            raise Skip(f"no kernel in this onnxruntime: {str(e).split(':')[-1].strip()}") from None
        raise


def host_value(a: np.ndarray):
    """An OrtValue over `a`'s memory (the OrtValue keeps it alive); bf16 goes in as its bits, since
    NumPy has no bfloat16 ORT knows."""
    import onnxruntime as ort
    from onnx import TensorProto

    a = np.ascontiguousarray(a)
    if a.dtype == numpy_dtype("bf16"):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.int16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(a)


def _ort_call(sess, spec: Spec):
    if spec.dtype != "bf16":
        return lambda inputs: sess.run(None, inputs)[0].astype(np.float64)
    # NumPy has no bfloat16 ORT knows, so bf16 goes in as OrtValues made from the bits, and comes out
    # through an io_binding on the CPU, read back as bits.
    import ctypes

    bf16 = numpy_dtype("bf16")

    def call(inputs):
        binding = sess.io_binding()
        values = {name: host_value(a) for name, a in inputs.items()}  # alive until the run is over
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(sess.get_outputs()[0].name, "cpu")
        sess.run_with_iobinding(binding)
        out = binding.get_outputs()[0]
        if out.data_type() != "tensor(bfloat16)":
            return out.numpy().astype(np.float64)
        n = int(np.prod(out.shape()))
        bits = np.frombuffer((ctypes.c_uint16 * n).from_address(out.data_ptr()), dtype=np.uint16).copy()
        return bits.view(bf16).reshape(out.shape()).astype(np.float64)

    return call


def _ort(model, provider: str, options: dict | None = None, optimize: bool = True, label: str = ""):
    """(run, provider) of an ORT session on `model`, bytes or a path; `run.session` is the session (the
    Spec adapters' bf16 path). A model given by path is a large one (pe_export.rewriter.copies): it runs
    without weight prepacking, which on a 2 GB Llama took 15 of its 20 s and a second copy of its MatMul
    weights (the kernels are the same, on unpacked weights), and without spinning threads."""
    small = isinstance(model, bytes)
    sess = ort_session(model, provider, options, optimize, prepack=small, spin=small)
    ran = require_provider(sess, provider) if provider != "CPUExecutionProvider" else sess.get_providers()[0]

    def run(inputs):
        return sess.run(None, inputs)

    run.session = sess
    return run, ran + label


def graph_ort_cpu(model):
    return _ort(model, "CPUExecutionProvider")


def graph_ort_cpu_noopt(model):
    return _ort(model, "CPUExecutionProvider", optimize=False, label=" (no graph optimisation)")


def graph_ort_cuda(model):
    # ORT's CUDA EP runs float32 MatMuls in TF32 by default on Ampere and later (10-bit mantissa: errors
    # of ~1e-3 in an attention layer, measured on an H100). Verification checks the file in the precision
    # it declares, so TF32 is switched off here (docs/verification.md: "CUDA and TF32").
    return _ort(model, "CUDAExecutionProvider", {"use_tf32": "0"})


# The Spec adapters: the first output, float64 (bf16 through an io_binding). Module-level functions: a
# worker process imports its adapter by name.
def run_ort_cpu(spec: Spec, model_bytes: bytes):
    run, provider = graph_ort_cpu(model_bytes)
    return _ort_call(run.session, spec), provider


def run_ort_cpu_noopt(spec: Spec, model_bytes: bytes):
    run, provider = graph_ort_cpu_noopt(model_bytes)
    return _ort_call(run.session, spec), provider


def run_ort_cuda(spec: Spec, model_bytes: bytes):
    run, provider = graph_ort_cuda(model_bytes)
    return _ort_call(run.session, spec), provider


def require_provider(sess, provider: str) -> str:
    """The provider the session runs on, which must be the one asked for: ORT falls back to CPU
    silently, and that is a failure here."""
    ran = sess.get_providers()[0]
    if ran != provider:
        raise RuntimeError(f"asked for {provider} but the session runs on {ran}")
    return ran
