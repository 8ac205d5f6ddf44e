"""The runtimes an exported graph is checked on, each a small adapter behind one interface:

    RUNTIMES[name](spec, model_bytes) -> (call, provider)
    GRAPH_RUNTIMES[name](model) -> (run, provider)    # model: bytes, or a path (external data beside it)

`call(inputs: {name: ndarray}) -> float64 ndarray` runs the graph (or, for `torch`, the PyTorch module
the graph was exported from, in the export dtype) and `provider` names what actually ran it. An adapter
that cannot run here raises `Skip` with the reason; any other exception is a failure of that runtime.
`GRAPH_RUNTIMES` are the same runtimes for any ONNX graph, without a Spec (`pe-export rewrite` verifies
foreign models with them): `run(inputs) -> [ndarray]`, every output in the graph's order and dtype. They
take the model as bytes or as a path: large models (pe_export.rewriter.copies) go by path, their external
data read from beside the file (those that need bytes read it in: `graphs.in_memory`, up to 2 GiB). The
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

One module per runtime (`ort.py`, `onnx_reference.py`, `openvino.py`, `tract.py`, `ort_web.py`,
`ort_web_browser.py`, `iree.py`, `litert.py`, `torch_eager.py`), each importing its runtime only inside
the adapter; this module is the registry. Every runtime but `torch` runs in a worker process of its own
with a time limit (pe_export.runtimes.worker):
a crash or a hang is a row, not the end of the report. A runtime that rejects a graph for a reason
of its own (an op or a dtype it lacks) raises `Unsupported`: "cannot load", a limit of the runtime,
not an error of the file. The server runtimes (ORT, onnx's evaluator, OpenVINO) keep such errors as
failures: they are the ones a file is verified on (DEFAULT_RUNTIMES); the edge runtimes (EDGE_RUNTIMES)
run when named.
"""

from __future__ import annotations

from pe_export.errors import BadInput
from pe_export.runtimes import iree, litert, onnx_reference, openvino, ort, ort_web, ort_web_browser, torch_eager, tract
from pe_export.runtimes.outcomes import Skip, Unsupported  # noqa: F401 (re-exported)

RUNTIMES = {
    "torch": torch_eager.run_torch,
    "ort-cpu": ort.run_ort_cpu,
    "ort-cpu-noopt": ort.run_ort_cpu_noopt,
    "ort-cuda": ort.run_ort_cuda,
    "onnx-reference": onnx_reference.run_onnx_reference,
    "openvino": openvino.run_openvino,
    "tract": tract.run_tract,
    "ort-web": ort_web.run_ort_web,
    "ort-web-browser": ort_web_browser.run_ort_web_browser,
    "ort-web-browser-webgpu": ort_web_browser.run_ort_web_browser_webgpu,
    "iree": iree.run_iree,
    "litert": litert.run_litert,
}
GRAPH_RUNTIMES = {  # the same runtimes for any ONNX graph (no Spec; torch has no meaning there)
    "ort-cpu": ort.graph_ort_cpu,
    "ort-cpu-noopt": ort.graph_ort_cpu_noopt,
    "ort-cuda": ort.graph_ort_cuda,
    "onnx-reference": onnx_reference.graph_onnx_reference,
    "openvino": openvino.graph_openvino,
    "tract": tract.graph_tract,
    "ort-web": ort_web.graph_ort_web,
    "ort-web-browser": ort_web_browser.graph_ort_web_browser,
    "ort-web-browser-webgpu": ort_web_browser.graph_ort_web_browser_webgpu,
    "iree": iree.graph_iree,
    "litert": litert.graph_litert,
}
EDGE_RUNTIMES = ("tract", "ort-web", "ort-web-browser", "ort-web-browser-webgpu", "iree", "litert")  # run when named
HEAVY_RUNTIMES = ("iree", "litert")  # large optional installs: their tests are the `heavy_runtimes` group
DEFAULT_RUNTIMES = tuple(n for n in RUNTIMES if n not in EDGE_RUNTIMES)  # the server runtimes a file is verified on


def check_names(names, known=RUNTIMES, option: str = "--runtimes") -> tuple[str, ...]:
    """The one runtime-name check: `names` (a comma-separated string or a sequence) as a tuple in the
    order given, without repeats, each one of `known`; otherwise BadInput naming the valid names."""
    given = names.split(",") if isinstance(names, str) else list(names)
    chosen = tuple(dict.fromkeys(n.strip() for n in given if n.strip()))
    if not chosen or any(n not in known for n in chosen):
        text = names if isinstance(names, str) else ",".join(names)
        raise BadInput(f"{option} takes a comma-separated list of {', '.join(known)}; got {text!r}")
    return chosen
