"""The runtimes an exported graph is checked on, each a small adapter behind one interface:

    RUNTIMES[name](spec, model_bytes) -> (call, provider)
    GRAPH_RUNTIMES[name](model_bytes) -> (run, provider)

`call(inputs: {name: ndarray}) -> float64 ndarray` runs the graph (or, for `torch`, the PyTorch module
the graph was exported from, in the export dtype) and `provider` names what actually ran it. An adapter
that cannot run here raises `Skip` with the reason; any other exception is a failure of that runtime.
`GRAPH_RUNTIMES` are the same runtimes for any ONNX graph, without a Spec (`pe-export rewrite` verifies
foreign models with them): `run(inputs) -> [ndarray]`, every output in the graph's order and dtype. The
Spec adapters are thin layers over them (the first output, float64; bf16 handled per runtime).

    torch            the torch module in the export dtype, eager on CPU
    ort-cpu          ONNX Runtime, CPUExecutionProvider, graph optimisations fully on (ORT's default)
    ort-cpu-noopt    the same with graph optimisations off: the graph as written
    ort-cuda         CUDAExecutionProvider; a session that lands on CPU is a failure, not a pass
    onnx-reference   onnx's ReferenceEvaluator, an independent implementation of the standard ops
    openvino         OpenVINO's ONNX frontend on CPU (the optional `openvino` extra)
    tract            tract (Sonos' Rust runtime, pip `tract`, the optional `tract` extra), CPU
    ort-web          onnxruntime-web's WASM backend under Node (`npm ci --prefix js`; see pe_export/ort_web.py)
    ort-web-browser  onnxruntime-web's WASM backend in a headless Chromium page (`apt-get install chromium`;
                     see pe_export/ort_web_browser.py)
    ort-web-browser-webgpu  the same page on its WebGPU backend, when the browser offers an adapter
    iree             IREE: its ONNX importer, compiled for llvm-cpu, run by its runtime (the optional `iree` extra)
    litert           LiteRT's interpreter on a .tflite from onnx2tf (the optional `litert` extra; pe_export/litert.py)

Every runtime but `torch` runs in a worker process of its own with a time limit (pe_export.worker):
a crash or a hang is a row, not the end of the report. A runtime that rejects a graph for a reason
of its own (an op or a dtype it lacks) raises `Unsupported`: "cannot load", a limit of the runtime,
not an error of the file. The server runtimes (ORT, onnx's evaluator, OpenVINO) keep such errors as
failures: they are the ones a file is verified on (DEFAULT_RUNTIMES); the edge runtimes (EDGE_RUNTIMES)
run when named.
"""

from __future__ import annotations

import io

import numpy as np

from pe_export.encodings.attention import encoding_for
from pe_export.dtypes import numpy_dtype
from pe_export.errors import one_line
from pe_export.outcomes import Skip, Unsupported  # noqa: F401 (re-exported)
from pe_export.spec import Spec


def to_torch(a: np.ndarray):
    import torch

    if a.dtype == numpy_dtype("bf16"):  # NumPy has no bfloat16 of its own: go through the bits
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def run_torch(spec: Spec, model_bytes: bytes):
    import torch

    module = encoding_for(spec).module(spec)

    def call(inputs):
        args = [to_torch(v) for v in inputs.values()]
        with torch.no_grad():
            y = module(*args)
        return y.to(torch.float64).numpy()

    return call, "eager (CPU)"


def ort_session(model_bytes: bytes, provider: str, options: dict | None = None, optimize: bool = True):
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install 'pe-export[cpu]' or 'pe-export[gpu]')") from None
    if provider not in ort.get_available_providers():
        raise Skip(f"{provider} not available in this onnxruntime build")
    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # failures come back as exceptions, not log lines
    try:
        providers = [provider] if provider == "CPUExecutionProvider" else [(provider, options or {}), "CPUExecutionProvider"]
        return ort.InferenceSession(model_bytes, opts, providers=providers)
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


def _ort(model_bytes: bytes, provider: str, options: dict | None = None, optimize: bool = True, label: str = ""):
    """(run, provider) of an ORT session; `run.session` is the session (the Spec adapters' bf16 path)."""
    sess = ort_session(model_bytes, provider, options, optimize)
    ran = require_provider(sess, provider) if provider != "CPUExecutionProvider" else sess.get_providers()[0]

    def run(inputs):
        return sess.run(None, inputs)

    run.session = sess
    return run, ran + label


def graph_ort_cpu(model_bytes: bytes):
    return _ort(model_bytes, "CPUExecutionProvider")


def graph_ort_cpu_noopt(model_bytes: bytes):
    return _ort(model_bytes, "CPUExecutionProvider", optimize=False, label=" (no graph optimisation)")


def graph_ort_cuda(model_bytes: bytes):
    # ORT's CUDA EP runs float32 MatMuls in TF32 by default on Ampere and later (10-bit mantissa: errors
    # of ~1e-3 in an attention layer, measured on an H100). Verification checks the file in the precision
    # it declares, so TF32 is switched off here (README: "CUDA and TF32").
    return _ort(model_bytes, "CUDAExecutionProvider", {"use_tf32": "0"})


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


def first_output(run):
    """A Spec adapter's `call` over a graph adapter's `run`: the first output as float64 (`run.time`,
    an adapter's own timing, kept)."""

    def call(inputs):
        return np.asarray(run(inputs)[0]).astype(np.float64)

    if hasattr(run, "time"):
        call.time = run.time
    return call


def require_provider(sess, provider: str) -> str:
    """The provider the session runs on, which must be the one asked for: ORT falls back to CPU
    silently, and that is a failure here."""
    ran = sess.get_providers()[0]
    if ran != provider:
        raise RuntimeError(f"asked for {provider} but the session runs on {ran}")
    return ran


def all_nodes(graph):
    """Every node of the graph, those inside control-flow subgraphs (If, Loop, Scan) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from all_nodes(sub)


def reference_evaluator(model):
    """onnx's ReferenceEvaluator for the model, or Skip when a node uses a domain it has no ops for
    (the domains nodes use, not those opset_import lists: ORT's optimised files import nine)."""
    from onnx.reference import ReferenceEvaluator

    custom = sorted({n.domain for n in all_nodes(model.graph) if n.domain not in ("", "ai.onnx")})
    if custom:
        raise Skip(f"onnx's ReferenceEvaluator has no ops of domain {', '.join(custom)}")
    return ReferenceEvaluator(model)


def graph_onnx_reference(model_bytes: bytes):
    import onnx

    ev = reference_evaluator(onnx.load_from_string(model_bytes))
    return (lambda inputs: [np.asarray(v) for v in ev.run(None, inputs)]), "ReferenceEvaluator"


def run_onnx_reference(spec: Spec, model_bytes: bytes):
    run, provider = graph_onnx_reference(model_bytes)
    return first_output(run), provider


def graph_openvino(model_bytes: bytes):
    try:
        import openvino as ov
    except ImportError:
        raise Skip("openvino is not installed (pip install 'pe-export[openvino]')") from None
    core = ov.Core()
    model = core.read_model(io.BytesIO(model_bytes))
    # f32: on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise run float32 graphs in bf16.
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    name = f"OpenVINO {ov.__version__.split('-')[0]} CPU"
    if computes_in_float64(model_bytes):  # its CPU plugin has no float64 kernels (dynamic NTK's in-graph angles)
        name += ", float64 math run in float32"

    def run(inputs):
        got = compiled(inputs)
        return [np.asarray(got[out]) for out in compiled.outputs]

    return run, name


def run_openvino(spec: Spec, model_bytes: bytes):
    if spec.dtype == "bf16":
        raise Skip("OpenVINO's Python API takes no NumPy bfloat16 arrays")
    run, provider = graph_openvino(model_bytes)
    return first_output(run), provider


def computes_in_float64(model_bytes: bytes) -> bool:
    """True when the graph holds float64 constants or casts to float64."""
    import onnx
    from onnx import TensorProto

    graph = onnx.load_from_string(model_bytes).graph
    casts = (a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
    return TensorProto.DOUBLE in casts or any(t.data_type == TensorProto.DOUBLE for t in graph.initializer)


def custom_domains(model_bytes: bytes) -> list[str]:
    import onnx

    return sorted({n.domain for n in all_nodes(onnx.load_from_string(model_bytes).graph) if n.domain not in ("", "ai.onnx")})


def graph_tract(model_bytes: bytes, threads: int | None = None):
    """tract from its Python package; `threads` is accepted for bench and not used (tract's Python API
    sets no thread count: it runs the graph on its own executor). The inputs go in the graph's order."""
    try:
        import tract
    except ImportError:
        raise Skip("tract is not installed (pip install 'pe-export[tract]')") from None
    domains = custom_domains(model_bytes)
    if domains:
        raise Unsupported(f"cannot load: tract has no ops of domain {', '.join(domains)}")
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:  # tract loads from a path only
        f.write(model_bytes)
        f.flush()
        try:
            model = tract.onnx().load(f.name).into_model().into_runnable()
        except Exception as e:
            raise Unsupported(f"cannot load: {one_line(e)}") from None

    def run(inputs):
        return [t.to_numpy() for t in model.run(list(inputs.values()))]

    def time(inputs, repeat):  # tract's own run, on tensors converted once
        import time as clock

        tensors = [tract.Tensor.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()]
        times = []
        for _ in range(repeat):
            t = clock.perf_counter()
            model.run(tensors)
            times.append(clock.perf_counter() - t)
        return times

    run.time = time
    return run, f"tract {tract.version()} CPU"


def run_tract(spec: Spec, model_bytes: bytes, threads: int | None = None):
    if spec.dtype == "bf16":
        raise Skip("tract's Python API takes no NumPy bfloat16 arrays")
    run, provider = graph_tract(model_bytes, threads)
    return first_output(run), provider


def graph_ort_web(model_bytes: bytes, threads: int = 1):
    from pe_export.ort_web import NodeSession

    s = NodeSession(model_bytes, threads)
    return s.run_all, s.provider


def run_ort_web(spec: Spec, model_bytes: bytes, threads: int = 1):
    from pe_export.ort_web import session

    return session(spec, model_bytes, threads)


def graph_ort_web_browser(model_bytes: bytes, threads: int = 1):
    from pe_export.ort_web_browser import graph_session

    return graph_session(model_bytes, threads, "wasm")


def graph_ort_web_browser_webgpu(model_bytes: bytes, threads: int = 1):
    from pe_export.ort_web_browser import graph_session

    return graph_session(model_bytes, threads, "webgpu")


def run_ort_web_browser(spec: Spec, model_bytes: bytes, threads: int = 1):
    from pe_export.ort_web_browser import session

    return session(spec, model_bytes, threads, "wasm")


def run_ort_web_browser_webgpu(spec: Spec, model_bytes: bytes, threads: int = 1):
    from pe_export.ort_web_browser import session

    return session(spec, model_bytes, threads, "webgpu")


def graph_iree(model_bytes: bytes, threads: int | None = None):
    """Import with iree's ONNX importer, compile for llvm-cpu (this host's CPU), run on `local-task`."""
    try:
        import iree.compiler as compiler
        import iree.runtime as rt
    except ImportError:
        raise Skip("iree is not installed (pip install 'pe-export[iree]')") from None
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="pe-export-iree-") as tmp:
        onnx_path, mlir = Path(tmp) / "model.onnx", Path(tmp) / "model.mlir"
        onnx_path.write_bytes(model_bytes)
        done = subprocess.run([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(onnx_path), "-o", str(mlir)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise Unsupported(f"does not import: {_first_error(done.stderr)}")
        try:
            vmfb = compiler.compile_file(str(mlir), target_backends=["llvm-cpu"], extra_args=["--iree-llvmcpu-target-cpu=host"])
        except Exception as e:
            raise Unsupported(f"does not compile: {_first_error(str(e))}") from None
    ctx = rt.SystemContext(config=rt.Config("local-task"))
    module = rt.VmModule.copy_buffer(ctx.instance, vmfb)
    ctx.add_vm_module(module)
    name = next(n for n in module.function_names if not n.startswith("__") and "$" not in n)
    function = ctx.modules[module.name][name]

    def run(inputs):
        got = function(*[np.ascontiguousarray(v) for v in inputs.values()])
        return [np.asarray(v) for v in (got if isinstance(got, (tuple, list)) else [got])]

    import iree.compiler.version as version

    return run, f"IREE {getattr(version, 'VERSION', '')} llvm-cpu (local-task)".replace("  ", " ")


def run_iree(spec: Spec, model_bytes: bytes, threads: int | None = None):
    if spec.dtype == "bf16":
        raise Skip("not tried: NumPy bfloat16 arrays into iree's runtime")
    run, provider = graph_iree(model_bytes, threads)
    return first_output(run), provider


def _first_error(text: str) -> str:
    """The first line of a compiler's output that says `error:`, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = next((line for line in lines if "error:" in line), lines[-1] if lines else "no message")
    return found.split("error:", 1)[-1].split(": %")[0].strip()[:200]  # the message, not the IR it quotes


def graph_litert(model_bytes: bytes, threads: int | None = None):
    from pe_export.litert import graph_litert

    return graph_litert(model_bytes, threads)


def run_litert(spec: Spec, model_bytes: bytes, threads: int | None = None):
    from pe_export.litert import graph_litert

    run, provider = graph_litert(model_bytes, threads, "float16" if spec.dtype == "fp16" else "float32")
    return first_output(run), provider


RUNTIMES = {
    "torch": run_torch,
    "ort-cpu": run_ort_cpu,
    "ort-cpu-noopt": run_ort_cpu_noopt,
    "ort-cuda": run_ort_cuda,
    "onnx-reference": run_onnx_reference,
    "openvino": run_openvino,
    "tract": run_tract,
    "ort-web": run_ort_web,
    "ort-web-browser": run_ort_web_browser,
    "ort-web-browser-webgpu": run_ort_web_browser_webgpu,
    "iree": run_iree,
    "litert": run_litert,
}
GRAPH_RUNTIMES = {  # the same runtimes for any ONNX graph (no Spec; torch has no meaning there)
    "ort-cpu": graph_ort_cpu,
    "ort-cpu-noopt": graph_ort_cpu_noopt,
    "ort-cuda": graph_ort_cuda,
    "onnx-reference": graph_onnx_reference,
    "openvino": graph_openvino,
    "tract": graph_tract,
    "ort-web": graph_ort_web,
    "ort-web-browser": graph_ort_web_browser,
    "ort-web-browser-webgpu": graph_ort_web_browser_webgpu,
    "iree": graph_iree,
    "litert": graph_litert,
}
EDGE_RUNTIMES = ("tract", "ort-web", "ort-web-browser", "ort-web-browser-webgpu", "iree", "litert")
HEAVY_RUNTIMES = ("iree", "litert")  # large optional installs: their tests are the `heavy_runtimes` group, not run by default  # run when named: verify's default stays the server runtimes
DEFAULT_RUNTIMES = tuple(n for n in RUNTIMES if n not in EDGE_RUNTIMES)
