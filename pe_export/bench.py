"""`pe-export bench`: how fast an exported graph runs under ONNX Runtime, against a memcpy of the same bytes.

The graph is applied to realistic shapes built from its own contract (the dynamic axes its example
inputs declare): a prefill of S tokens and a single-token decode, both at the end of the table.

    rotary     x (B, H, S, D) or (B, S, H, D), position_ids (B, S); decode: S = 1 at position P - 1
    absolute   position_ids (B, S) -> (B, S, dim); decode: (B, 1)
    bias       query_positions (Q,), key_positions (K,) -> (1, H, Q, K); prefill Q = K = S, decode Q = 1
    attention  query (B, H, Q, D), key and value (B, H, K, D); prefill Q = K = S, decode Q = 1, K = S

Byte model (what "GB/s" counts): every input read once plus every output written once, plus for a
rotary graph the cos and sin rows it gathers (2 * B * S * R/2 elements of the table dtype). The memcpy
baseline copies a buffer of half that many bytes into another (read + write = the same byte count), in
the same process, timed in turn with the op (one copy, one call, ...), so that `ratio = memcpy time /
op time` compares like with like on a shared machine (NumPy's copy uses one thread whatever --threads
says; on CUDA the copy is an ORT Identity with input and output on the device). Bias and attention outputs grow as S^2, so their default S is capped lower (1024).

The ORT session runs with graph optimisations fully on and `intra_op_num_threads = threads`; inputs
and outputs are bound once with `io_binding` (preallocated), so Python's per-call overhead is the
binding's run call only. Each case is warmed up before it is timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from pe_export.errors import BadInput
from pe_export.spec import Spec, numpy_dtype

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SEQ_CAP = {"rotary": 4096, "absolute": 4096, "bias": 1024, "attention": 1024}
WARMUP = 3


@dataclass
class Case:
    """One measured shape on one provider."""

    name: str  # "prefill" or "decode"
    provider: str  # the provider that actually ran (sess.get_providers()[0])
    shapes: dict  # input name -> shape
    bytes: int  # by the byte model above
    op_s: float  # median seconds per call
    memcpy_s: float | None  # median seconds of the same-bytes copy
    gbps: float
    memcpy_gbps: float | None
    ratio: float | None  # memcpy_s / op_s: 1.0 runs at copy speed
    p50_ms: float
    p90_ms: float
    p99_ms: float
    repeat: int
    note: str = ""


@dataclass
class BenchResult:
    spec: dict
    threads: int
    batch: int
    heads: int
    seq: int
    byte_model: str
    cases: list[Case] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


BYTE_MODEL = "inputs read + outputs written (+ cos/sin rows gathered, rotary); memcpy copies half that many bytes"


def table_length(spec: Spec) -> int:
    """P, the table length of the encoding a spec exports (inside an attention layer or not)."""
    from pe_export.encodings import ENCODINGS
    from pe_export.encodings.attention import split

    base, _ = split(spec)
    return ENCODINGS.get(base.encoding).params(**base.params).max_positions


def make_inputs(spec: Spec, case: str, seq: int, batch: int, heads: int, seed: int = 0) -> dict:
    """Inputs of the graph's own contract at (batch, heads, seq); `case` "prefill" or "decode"."""
    from pe_export.encodings import encoding_for

    enc = encoding_for(spec)
    args, dynamic, names, _ = enc.example_inputs(spec)
    P = table_length(spec)
    query_len = seq if case == "prefill" else 1
    size = {"batch": batch, "heads": heads, "seq": query_len, "q": query_len, "k": seq}
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, example in zip(names, args):
        axes = {i: d.__name__ for i, d in (dynamic.get(name) or {}).items()}
        shape = tuple(size[axes[i]] if i in axes else int(n) for i, n in enumerate(example.shape))
        if str(example.dtype) == "torch.int64":
            # Positions at the end of the table along the last axis (queries end where the keys end).
            inputs[name] = np.broadcast_to(np.arange(P - shape[-1], P, dtype=np.int64), shape).copy()
        else:
            inputs[name] = rng.standard_normal(shape, dtype=np.float32).astype(numpy_dtype(spec.dtype))
    return inputs


def gathered_bytes(spec: Spec, inputs: dict) -> int:
    """cos and sin rows a rotary graph reads: 2 * B * S * R/2 table elements."""
    from pe_export.encodings import encoding_for

    if encoding_for(spec).kind != "rotary":
        return 0
    from pe_export.encodings.rope import RopeParams

    p = RopeParams(**spec.params)
    return 2 * inputs["position_ids"].size * (p.rotary_dim // 2) * np.dtype(numpy_dtype(spec.dtype)).itemsize


def session(model_bytes: bytes, provider: str, threads: int):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BadInput("onnxruntime is not installed (pip install 'pe-export[cpu]' or 'pe-export[gpu]')") from None
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise BadInput(f"{name} is not available in this onnxruntime build (available: {', '.join(ort.get_available_providers())})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    providers = [name] if provider == "cpu" else [name, "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(model_bytes, opts, providers=providers)
    except Exception as e:  # ORT's errors are not RuntimeErrors; the CLI prints one line either way
        raise RuntimeError(f"onnxruntime ({name}) could not load the graph: {' '.join(str(e).split())[:300]}") from None
    ran = sess.get_providers()[0]
    if ran != name:  # ORT falls back to CPU silently
        raise RuntimeError(f"asked for {name} but the session runs on {ran}")
    return sess


def bound_call(sess, inputs: dict, provider: str):
    """A no-argument call that runs the session on preallocated, bound inputs and outputs."""
    import onnxruntime as ort

    device = "cpu" if provider == "cpu" else "cuda"
    binding = sess.io_binding()
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    shape = sess.run(None, inputs)[0].shape  # the output's shape, once
    out_name = sess.get_outputs()[0].name
    out_type = sess.get_outputs()[0].type  # "tensor(float)", ...
    # uint8: the CUDA memcpy graph (an Identity of bytes); the others: what exports produce.
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(uint8)": np.uint8}[out_type]
    out = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)  # preallocated, written in place
    binding.bind_ortvalue_output(out_name, out)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (lambda: sess.run_with_iobinding(binding)), nbytes


def timed(calls, repeat: int) -> np.ndarray:
    """(len(calls), repeat) seconds: each round times every call once, in turn, after WARMUP untimed
    rounds, so that a memcpy and the op timed in the same round see the same machine load."""
    for _ in range(WARMUP):
        for call in calls:
            call()
    times = np.empty((len(calls), repeat))
    for i in range(repeat):
        for j, call in enumerate(calls):
            t = time.perf_counter()
            call()
            times[j, i] = time.perf_counter() - t
    return times


def memcpy_call(nbytes: int, provider: str, threads: int):
    """A copy of nbytes / 2 bytes between two preallocated buffers (read + write = nbytes)."""
    half = max(nbytes // 2, 1)
    if provider == "cpu":
        src, dst = np.ones(half, np.uint8), np.zeros(half, np.uint8)
        return lambda: np.copyto(dst, src), "NumPy copy, one thread"
    import onnx
    from onnx import TensorProto, helper

    # A device-to-device copy: an Identity whose input and output both live on the GPU.
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "memcpy",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [half])],
        [helper.make_tensor_value_info("b", TensorProto.UINT8, [half])],
    )
    # IR version 10: onnx's default follows onnx, and an older ORT refuses a newer IR (seen: ORT 1.31, onnx 1.23).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    sess = session(model.SerializeToString(), provider, threads)
    call, _ = bound_call(sess, {"a": np.ones(half, np.uint8)}, provider)
    return call, "ORT Identity on the device"


def bench(
    spec: Spec,
    model_bytes: bytes,
    providers=("cpu",),
    threads: int = 2,
    seq: int | None = None,
    batch: int = 1,
    heads: int = 32,
    repeat: int = 20,
) -> BenchResult:
    """Measure prefill and decode of a graph on each provider (see the module docstring)."""
    from pe_export.encodings import encoding_for

    if getattr(spec, "static_shapes", None):
        raise BadInput(f"bench needs symbolic batch and lengths; this file was exported with static shapes {spec.static_shapes}")
    kind = encoding_for(spec).kind
    P = table_length(spec)
    if seq is None:
        seq = min(SEQ_CAP[kind], P)
    if not 1 <= seq <= P:
        raise BadInput(f"--seq must be in [1, {P}] (the table length), got {seq}")
    for name, value, low in (("--threads", threads, 1), ("--batch", batch, 1), ("--heads", heads, 1), ("--repeat", repeat, 3)):
        if value < low:
            raise BadInput(f"{name} must be >= {low}, got {value}")
    if spec.dtype == "bf16":
        raise BadInput("bench cannot time bf16 graphs: onnxruntime's Python API cannot pass bfloat16 tensors")
    result = BenchResult(spec=asdict(spec), threads=threads, batch=batch, heads=heads, seq=seq, byte_model=BYTE_MODEL)
    for provider in providers:
        if provider not in PROVIDERS:
            raise BadInput(f"--providers takes a comma-separated list of {', '.join(PROVIDERS)}, got {provider!r}")
        sess = session(model_bytes, provider, threads)
        for case in ("prefill", "decode"):
            inputs = make_inputs(spec, case, seq, batch, heads)
            call, out_bytes = bound_call(sess, inputs, provider)
            nbytes = sum(v.nbytes for v in inputs.values()) + out_bytes + gathered_bytes(spec, inputs)
            copy, how = memcpy_call(nbytes, provider, threads)
            reps = repeat if case == "prefill" else max(repeat, 200)  # decode is short: more samples for p99
            copy_times, times = timed([copy, call], reps)
            copy_s, op_s = float(np.median(copy_times)), float(np.median(times))
            ms = np.percentile(times, [50, 90, 99]) * 1e3
            result.cases.append(
                Case(
                    name=case,
                    provider=sess.get_providers()[0],
                    shapes={k: list(v.shape) for k, v in inputs.items()},
                    bytes=int(nbytes),
                    op_s=op_s,
                    memcpy_s=copy_s,
                    gbps=nbytes / op_s / 1e9,
                    memcpy_gbps=nbytes / copy_s / 1e9,
                    ratio=copy_s / op_s,
                    p50_ms=float(ms[0]),
                    p90_ms=float(ms[1]),
                    p99_ms=float(ms[2]),
                    repeat=reps,
                    note=f"memcpy: {how}; ORT intra_op_num_threads={threads}",
                )
            )
    return result


def bench_file(path, **options) -> BenchResult:
    """`bench` of a file pe-export wrote (its spec read back from the metadata)."""
    from pe_export.export import load

    model, spec = load(path)
    return bench(spec, model.SerializeToString(), **options)
