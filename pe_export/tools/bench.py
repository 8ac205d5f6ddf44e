"""`pe-export bench`: how fast an exported graph runs (ONNX Runtime, tract, ort-web), against a memcpy of
the same bytes.

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
op time` compares like with like on a shared machine. On the CPU the copy is ORT running a graph that
really copies x into y (float32 `Mul(x, 1)`, graph optimisations off so that it is not removed) with
the same `intra_op_num_threads` as the graph: 1.0 means "at the speed of memory" with those threads on
any machine (a one-thread NumPy copy against a two-thread graph gave ratios above 1). On CUDA the copy
is an ORT Identity with input and output on the device. Bias and attention outputs grow as S^2, so
their default S is capped lower (1024).

Other runtimes (`runtimes`: tract, ort-web) run the same inputs in their worker process
(pe_export.runtimes.worker), timed by the runtime's own loop (tract's run on tensors converted once; ort-web's
`session.run` inside Node), and their ratio is to the same run's ORT CPU memcpy, timed just before and
just after them, so every runtime is compared with one yardstick.

The ORT session runs with graph optimisations fully on and `intra_op_num_threads = threads`; inputs
are placed on the provider's device and the output preallocated there, bound once with `io_binding`,
so Python's per-call overhead is the binding's run call only (bf16 goes in as OrtValues made from the
bits). Each case is warmed up before it is timed. A file exported with static shapes is timed at its
own shapes only: a prefill, or a decode when S is 1.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from pe_export.dtypes import numpy_dtype
from pe_export.errors import BadInput, one_line
from pe_export.spec import Spec

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
    runtime: str = "ort"  # "ort" (the --providers rows) or a verify runtime's name (tract, ort-web)


@dataclass
class BenchResult:
    spec: dict
    threads: int
    batch: int
    heads: int
    seq: int
    byte_model: str
    cases: list[Case] = field(default_factory=list)
    time_by_op: dict = field(default_factory=dict)  # provider -> [(op type, share)] (bench --profile)

    def as_dict(self) -> dict:
        return asdict(self)


BYTE_MODEL = "inputs read + outputs written (+ cos/sin rows gathered, rotary); memcpy copies half that many bytes"


def table_length(spec: Spec) -> int:
    """P, the table length of the encoding a spec exports (inside an attention layer or not)."""
    from pe_export.encodings import ENCODINGS
    from pe_export.encodings.attention import split

    base, _ = split(spec)
    return ENCODINGS.get(base.encoding).parse(base).max_positions


def input_shapes(spec: Spec, case: str, seq: int, batch: int, heads: int) -> dict:
    """{input name: (shape, NumPy dtype)} of the graph's own contract at (batch, heads, seq), nothing
    allocated; `case` "prefill" or "decode"."""
    from pe_export.encodings.attention import encoding_for

    args, dynamic, names, _ = encoding_for(spec).example_inputs(spec)
    query_len = seq if case == "prefill" else 1
    size = {"batch": batch, "heads": heads, "seq": query_len, "q": query_len, "k": seq}
    shapes = {}
    for name, example in zip(names, args):
        axes = {i: d.__name__ for i, d in (dynamic.get(name) or {}).items()}
        shape = tuple(size[axes[i]] if i in axes else int(n) for i, n in enumerate(example.shape))
        shapes[name] = (
            shape,
            np.dtype(np.int64) if str(example.dtype) == "torch.int64" else np.dtype(numpy_dtype(spec.dtype)),
        )
    return shapes


def make_inputs(spec: Spec, case: str, seq: int, batch: int, heads: int, seed: int = 0) -> dict:
    """Inputs of the graph's own contract at (batch, heads, seq); `case` "prefill" or "decode"."""
    P = table_length(spec)
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, (shape, dtype) in input_shapes(spec, case, seq, batch, heads).items():
        if dtype == np.int64:
            # Positions at the end of the table along the last axis (queries end where the keys end).
            inputs[name] = np.broadcast_to(np.arange(P - shape[-1], P, dtype=np.int64), shape).copy()
        else:
            inputs[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return inputs


def memory_limit() -> int:
    """Bytes the prefill's inputs may take: a quarter of this machine's memory (the output, the copy's
    two buffers and the runtime's own need the rest)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def check_size(spec: Spec, seq: int, batch: int, heads: int) -> None:
    """Refuse a --batch or --heads whose inputs would not fit (memory_limit), naming the valid range,
    before anything is allocated."""
    limit = memory_limit()

    def nbytes(b, h):
        return sum(
            int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            for shape, dtype in input_shapes(spec, "prefill", seq, b, h).values()
        )

    h = min(heads, 1 << 20)  # heads first bounded, so that the batch check's own sizes stay small
    for name, value, size in (
        ("--batch", batch, lambda n: nbytes(n, h)),
        ("--heads", heads, lambda n: nbytes(min(batch, 1 << 20), n)),
    ):
        base, grows = size(1), size(2) - size(1)  # bytes at 1, and per further unit (0: no such axis)
        top = max(1, (limit - base) // grows + 1) if grows > 0 else None
        if top is not None and value > top:
            raise BadInput(
                f"{name} must be in [1, {top}] for these shapes (the inputs must fit in {limit / 2**30:.0f} GiB, "
                f"a quarter of this machine's memory), got {value}"
            )


def gathered_bytes(spec: Spec, inputs: dict) -> int:
    """cos and sin rows a rotary graph reads from its tables: 2 * B * S * R/2 table elements (none when
    the graph computes cos/sin itself: --tables computed, dynamic NTK at run time)."""
    from pe_export.encodings.attention import encoding_for
    from pe_export.encodings.rope import RopeParams, computed_in_graph

    enc = encoding_for(spec)
    if enc.kind != "rotary":
        return 0
    p = enc.parse(spec)  # RoPE's, randomized RoPE's (a subclass) or xPos's
    if isinstance(p, RopeParams) and (p.tables == "computed" or computed_in_graph(p)):
        return 0
    rotary_dim = getattr(p, "rotary_dim", p.head_dim)
    return 2 * inputs["position_ids"].size * (rotary_dim // 2) * np.dtype(numpy_dtype(spec.dtype)).itemsize


def session(model_bytes: bytes, provider: str, threads: int, profile_prefix: str | None = None, optimize: bool = True):
    from pe_export.runtimes.ort import ort_session, require_provider
    from pe_export.runtimes.outcomes import Skip

    name = PROVIDERS[provider]
    try:
        sess = ort_session(model_bytes, name, optimize=optimize, threads=threads, profile_prefix=profile_prefix)
    except Skip as e:
        raise BadInput(str(e)) from None
    except Exception as e:  # ORT's errors are not RuntimeErrors; the CLI prints one line either way
        raise RuntimeError(f"onnxruntime ({name}) could not load the graph: {one_line(e)}") from None
    require_provider(sess, name)
    return sess


DEVICES = {"cpu": "cpu", "cuda": "cuda"}


def on_device(host, device: str):
    """A copy of a host OrtValue in memory of `device`, made once."""
    import onnxruntime as ort

    value = ort.OrtValue.ortvalue_from_shape_and_type(host.shape(), host.element_type(), device, 0)
    value.update_inplace(host)
    return value


def bound_call(sess, inputs: dict, provider: str):
    """A no-argument call that runs the session on inputs and an output preallocated on the device,
    bound once; returns (call, output bytes, the output OrtValue)."""
    import onnxruntime as ort
    from onnx import helper

    from pe_export.runtimes.ort import host_value

    device = DEVICES[provider]
    binding = sess.io_binding()
    keep = []  # the OrtValues, and through them the NumPy memory the CPU ones read
    for name, a in inputs.items():
        keep.append(host_value(a) if device == "cpu" else on_device(host_value(a), device))
        binding.bind_ortvalue_input(name, keep[-1])
    out_name = sess.get_outputs()[0].name
    binding.bind_output(out_name, device)  # one run lets ORT size the output ...
    sess.run_with_iobinding(binding)
    first = binding.get_outputs()[0]
    out = ort.OrtValue.ortvalue_from_shape_and_type(first.shape(), first.element_type(), device, 0)
    binding.bind_ortvalue_output(out_name, out)  # ... which is then preallocated and written in place
    itemsize = helper.tensor_dtype_to_np_dtype(first.element_type()).itemsize

    def call(_keep=keep):  # the default argument keeps the inputs' memory alive with the call
        sess.run_with_iobinding(binding)

    return call, int(np.prod(first.shape())) * itemsize, out


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


def copy_model(n: int) -> bytes:
    """An Identity of n bytes: bound to buffers on one device, a device-to-device copy."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "memcpy",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n])],
        [helper.make_tensor_value_info("b", TensorProto.UINT8, [n])],
    )
    # IR version 10: onnx's default follows onnx, and an older ORT refuses a newer IR (seen: ORT 1.31, onnx 1.23).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString()


def copy_graph(n: int) -> bytes:
    """y = x * 1 over n float32 values: a copy ORT splits over its intra-op threads, as it does the graph."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "one"], ["y"])],
        "memcpy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[numpy_helper.from_array(np.ones((), np.float32), "one")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString()


def memcpy_call(nbytes: int, provider: str, threads: int):
    """A copy of nbytes / 2 bytes between two preallocated buffers (read + write = nbytes): on the CPU
    ORT's threaded copy graph with `threads` intra-op threads, elsewhere an ORT Identity on the device."""
    half = max(nbytes // 2, 4)
    if provider == "cpu":
        sess = session(copy_graph(half // 4), provider, threads, optimize=False)
        x = np.arange(half // 4, dtype=np.float32)
        call, _, _ = bound_call(sess, {"x": x}, provider)
        return call, f"ORT copy graph (float32 Mul by 1) on cpu, intra_op_num_threads={threads}"
    sess = session(copy_model(half), provider, threads)
    call, _, _ = bound_call(sess, {"a": np.ones(half, np.uint8)}, provider)
    return call, f"ORT Identity, input and output on {DEVICES[provider]}"


def shapes(spec: Spec, seq: int | None, batch: int | None, heads: int | None) -> tuple[tuple[str, ...], int, int, int]:
    """(the cases to time, S, B, H), checked. B and H default to 1 and 32, S to min(SEQ_CAP, table
    length); a file exported with static shapes is timed at those shapes only (a prefill, or a decode
    when S is 1), and a --seq, --batch or --heads that differs is refused."""
    from pe_export.encodings.attention import encoding_for

    kind = encoding_for(spec).kind
    P = table_length(spec)
    cases = ("prefill", "decode")
    if spec.static_shapes:
        from pe_export.encodings.static_shapes import static_sizes

        sizes = static_sizes(spec)
        for name, given, size in (
            ("--seq", seq, sizes["seq"]),
            ("--batch", batch, sizes["batch"]),
            ("--heads", heads, sizes["heads"]),
        ):
            if given is not None and size is not None and given != size:
                fixed = ",".join(map(str, spec.static_shapes))
                raise BadInput(
                    f"{name} {given} does not fit this file's static shapes {fixed}: leave it out (or pass {size})"
                )
        seq, batch, heads = sizes["seq"], sizes["batch"], sizes["heads"]
        cases = ("decode",) if seq == 1 else ("prefill",)
    batch = 1 if batch is None else batch
    heads = 32 if heads is None else heads
    if seq is None:
        seq = min(SEQ_CAP[kind], P)
    if not 1 <= seq <= P:
        raise BadInput(f"--seq must be in [1, {P}] (the table length), got {seq}")
    for name, value in (("--batch", batch), ("--heads", heads)):
        if value < 1:
            raise BadInput(f"{name} must be >= 1, got {value}")
    check_size(spec, seq, batch, heads)
    return cases, seq, batch, heads


def check_options(providers, threads: int, repeat: int, runtimes=()) -> None:
    for name, value, low in (("--threads", threads, 1), ("--repeat", repeat, 3)):
        if value < low:
            raise BadInput(f"{name} must be >= {low}, got {value}")
    if runtimes:
        from pe_export.runtimes import check_names

        check_names(runtimes, BENCH_RUNTIMES)
    for provider in providers:
        if provider not in PROVIDERS:
            raise BadInput(f"--providers takes a comma-separated list of {', '.join(PROVIDERS)}, got {provider!r}")


def bench(
    spec: Spec,
    model_bytes: bytes,
    providers=("cpu",),
    threads: int = 2,
    seq: int | None = None,
    batch: int | None = None,
    heads: int | None = None,
    repeat: int = 20,
    runtimes=(),
) -> BenchResult:
    """Measure prefill and decode of a graph on each ORT provider and each other runtime (see the
    module docstring and `shapes`)."""
    cases, seq, batch, heads = shapes(spec, seq, batch, heads)
    check_options(providers, threads, repeat, runtimes)
    result = BenchResult(spec=asdict(spec), threads=threads, batch=batch, heads=heads, seq=seq, byte_model=BYTE_MODEL)
    for provider in providers:
        sess = session(model_bytes, provider, threads)
        for case in cases:
            inputs = make_inputs(spec, case, seq, batch, heads)
            call, out_bytes, _ = bound_call(sess, inputs, provider)
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
    for name in runtimes:
        result.cases += bench_runtime(name, spec, model_bytes, cases, seq, batch, heads, threads, repeat)
    return result


BENCH_RUNTIMES = (
    "tract",
    "ort-web",
    "ort-web-browser",
    "ort-web-browser-webgpu",
)  # runtimes beside ORT that time a graph in their own loop


def bench_runtime(name, spec, model_bytes, cases, seq, batch, heads, threads, repeat) -> list[Case]:
    """Prefill and decode on a verify runtime in its worker, each against ORT CPU's threaded copy of the
    same bytes timed just before and just after it (the runtime's own loop cannot interleave with it)."""
    from pe_export.runtimes import RUNTIMES, Skip, Unsupported, worker

    try:
        call, provider = worker.load(name, RUNTIMES[name], spec, model_bytes, options={"threads": threads})
    except (Skip, Unsupported) as e:
        raise BadInput(f"--runtimes {name}: {e}") from None
    except (worker.Crash, worker.Timeout, RuntimeError) as e:
        raise RuntimeError(f"{name} could not load the graph: {one_line(e)}") from None
    out = []
    itemsize = np.dtype(numpy_dtype(spec.dtype)).itemsize
    for case in cases:
        inputs = make_inputs(spec, case, seq, batch, heads)
        output = call(inputs)  # its size, and one untimed run
        nbytes = sum(v.nbytes for v in inputs.values()) + output.size * itemsize + gathered_bytes(spec, inputs)
        copy, how = memcpy_call(nbytes, "cpu", threads)
        reps = repeat if case == "prefill" else max(repeat, 200)
        call.time(inputs, WARMUP)
        before = timed([copy], max(reps // 2, 3))[0]
        times = np.asarray(call.time(inputs, reps))
        after = timed([copy], max(reps // 2, 3))[0]
        copy_s, op_s = float(np.median(np.concatenate([before, after]))), float(np.median(times))
        ms = np.percentile(times, [50, 90, 99]) * 1e3
        out.append(
            Case(
                name=case,
                provider=provider,
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
                note=f"memcpy: {how}, timed before and after; {name} timed in its own loop, threads={threads}",
                runtime=name,
            )
        )
    return out


def time_by_op(spec: Spec, model_bytes: bytes, provider="cpu", threads=2, seq=None, batch=None, heads=None, repeat=20):
    """Where the time of bench's first case (the prefill) goes: [(op type, share of the run time)],
    largest first, from ORT's own profiler over `repeat` bound runs (ops after ORT's graph
    optimisations; the last entry is the time outside kernels: scheduling, allocation)."""
    import json
    import os
    import tempfile
    from collections import Counter

    cases, seq, batch, heads = shapes(spec, seq, batch, heads)
    check_options((provider,), threads, repeat)
    if provider != "cpu":  # a CUDA kernel's event times its launch; the kernel runs later, on the stream
        raise BadInput(
            f"--profile splits the time by op on the cpu provider only (ORT's profiler times {provider} kernel "
            f"launches, not the kernels)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model_bytes, provider, threads, profile_prefix=os.path.join(tmp, "profile"))
        call, _, _ = bound_call(sess, make_inputs(spec, cases[0], seq, batch, heads), provider)
        for _ in range(repeat):
            call()
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    by_op, total = Counter(), 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"]
    shares = [(op, us / total) for op, us in by_op.most_common()]
    return shares + [("outside kernels", max(0.0, 1 - sum(share for _, share in shares)))]


def bench_file(path, profile: bool = False, **options) -> BenchResult:
    """`bench` of a file pe-export wrote (its spec read back from the metadata); `profile` adds
    `time_by_op` for each provider."""
    from pe_export.pipeline.onnx_export import load

    model, spec = load(path)
    data = model.SerializeToString()
    sizes = {k: options[k] for k in ("threads", "seq", "batch", "heads", "repeat") if options.get(k) is not None}
    # Profiled first: a provider it refuses then costs no benchmark.
    shares = {p: time_by_op(spec, data, p, **sizes) for p in options.get("providers", ("cpu",))} if profile else {}
    result = bench(spec, data, **options)
    result.time_by_op = shares
    return result
