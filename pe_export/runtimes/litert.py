"""The `litert` runtime, the Android path: the ONNX file converted by onnx2tf to a .tflite, run by
LiteRT's interpreter (`ai-edge-litert`) on CPU.

onnx2tf 2.x writes the .tflite itself (its default `flatbuffer_direct` backend: no TensorFlow), but it
needs Python >= 3.12 and pins numpy==2.2.6, onnx==1.20.1 and onnxruntime==1.26.0 exactly, so it cannot
share pe-export's environment. It runs as a subprocess, from the Python named by PE_EXPORT_ONNX2TF_PYTHON
(an environment of its own with onnx2tf installed), else this Python. The interpreter runs here, in the
runtime's worker process.

What keeps the graph's meaning: every input keeps its ONNX shape (`keep_shape_absolutely_input_names`:
no NCHW -> NHWC transpose of 4D inputs), inputs and outputs are matched by name, and the .tflite whose
float type is the graph's is the one run (onnx2tf writes `_float32` and `_float16` files; an fp16 graph
runs the `_float16` one, fp16 in and out). An op onnx2tf can only leave as a TFLite custom op (it retries
with custom ops when the builtin lowering fails), a dtype it lacks (bfloat16) or any failed conversion is
`Unsupported("does not convert: ...")`, a row of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pe_export.errors import one_line
from pe_export.runtimes.graphs import in_memory
from pe_export.runtimes.outcomes import Skip, Unsupported

CONVERTER = "PE_EXPORT_ONNX2TF_PYTHON"
INSTALL = (
    f"pip install 'pe-export[litert]' for the interpreter; onnx2tf in a Python >= 3.12 environment of its own, "
    f"named by {CONVERTER} (docs/runtimes.md: LiteRT)"
)
CONVERT_TIMEOUT_S = 100.0  # inside the worker's 120 s per load

# Runs in the converter's Python: pe-export is not installed there. Writes result.json into the folder.
_SCRIPT = r"""
import json, sys
src, out = sys.argv[1], sys.argv[2]
def done(**result):
    with open(out + "/result.json", "w") as f:
        json.dump(result, f)
    sys.exit(0)
try:
    import onnx, onnx2tf
except ImportError as e:
    done(missing=str(e))
names = [i.name for i in onnx.load(src, load_external_data=False).graph.input]
try:
    onnx2tf.convert(input_onnx_file_path=src, output_folder_path=out, keep_shape_absolutely_input_names=names,
                    non_verbose=True, report_op_coverage=True)
except BaseException as e:
    done(error=f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else f"onnx2tf exited with status {e.code}")
with open(out + "/model_op_coverage_report.json") as f:
    report = json.load(f)
custom = [n["onnx_op"] for n in report.get("custom_lowered_nodes", [])]
done(version=onnx2tf.__version__, custom=custom)
"""


def converter_python() -> str:
    return os.environ.get(CONVERTER) or sys.executable


def convert(model_bytes: bytes, folder: Path) -> tuple[dict, str]:
    """(onnx2tf's result, its version): writes model.onnx and onnx2tf's .tflite files into `folder`."""
    (folder / "model.onnx").write_bytes(model_bytes)
    python = converter_python()
    try:
        done = subprocess.run(
            [python, "-c", _SCRIPT, str(folder / "model.onnx"), str(folder)],
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise Skip(f"{CONVERTER}={python} does not exist; {INSTALL}") from None
    except subprocess.TimeoutExpired:
        raise Unsupported(f"does not convert: onnx2tf took more than {CONVERT_TIMEOUT_S:g} s") from None
    result_path = folder / "result.json"
    if not result_path.exists():  # the converter died before it could say why
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise Unsupported(
            f"does not convert: onnx2tf exited with status {done.returncode}"
            + (f"; {lines[-1][:200]}" if lines else "")
        )
    result = json.loads(result_path.read_text())
    if "missing" in result:
        raise Skip(f"onnx2tf is not importable from {python} ({result['missing']}); {INSTALL}")
    if "error" in result:
        raise Unsupported(f"does not convert: {one_line(result['error'], 200)}")
    if result["custom"]:
        ops = ", ".join(sorted(set(result["custom"])))
        raise Unsupported(
            f"does not convert: {ops} (onnx2tf leaves it a TFLite custom op, which LiteRT has no kernel for)"
        )
    return result, result["version"]


_LAST: dict = {}  # the last conversion and its outcome: verify and --probe-bounds load one file twice in a worker


def converted(model_bytes: bytes, kind: str) -> tuple[bytes, str]:
    """(the `_float32` or `_float16` .tflite, onnx2tf's version) for the file, or its `Unsupported`."""
    key = hashlib.sha256(model_bytes).hexdigest() + kind
    if key not in _LAST:
        _LAST.clear()
        with tempfile.TemporaryDirectory(prefix="pe-export-litert-") as tmp:
            try:
                _, version = convert(model_bytes, Path(tmp))
                _LAST[key] = ((Path(tmp) / f"model_{kind}.tflite").read_bytes(), version)
            except Unsupported as e:
                _LAST[key] = e
    if isinstance(_LAST[key], Unsupported):
        raise _LAST[key]
    return _LAST[key]


def float_kind(graph) -> str:
    """The .tflite of the graph's float type: "float16" when it takes or gives float16 values, else "float32"."""
    types = {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    return "float16" if 10 in types else "float32"  # 10: TensorProto.FLOAT16


def graph_litert(model_bytes: bytes, threads: int | None = None, kind: str | None = None):
    """(run, provider): `run(inputs)` returns every output of the graph, in its order, as LiteRT computed
    them from the `kind` .tflite (default: the graph's float type)."""
    model_bytes = in_memory(model_bytes)  # a path (a large model): read in, if under 2 GiB
    try:
        from ai_edge_litert import __version__ as litert_version
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise Skip(f"ai-edge-litert is not installed ({INSTALL})") from None
    import onnx

    graph = onnx.load_from_string(model_bytes).graph
    kind = kind or float_kind(graph)
    tflite, version = converted(model_bytes, kind)
    interpreter = Interpreter(model_content=tflite, num_threads=threads)
    try:
        interpreter.allocate_tensors()  # an op without a kernel here is found now, not at the first call
    except RuntimeError as e:
        raise Unsupported(f"does not run: {one_line(e, 200)}") from None
    inputs = {d["name"]: d for d in interpreter.get_input_details()}
    outputs = {d["name"]: d for d in interpreter.get_output_details()}
    onnx_inputs, onnx_outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    if sorted(inputs) != sorted(onnx_inputs) or any(n not in outputs for n in onnx_outputs):
        raise RuntimeError(
            f"the .tflite's inputs {sorted(inputs)} and outputs {sorted(outputs)} are not the graph's "
            f"{onnx_inputs} and {onnx_outputs}"
        )

    def run(values):
        for name, a in values.items():
            if a.dtype != inputs[name]["dtype"]:
                raise TypeError(f"input {name} is {a.dtype}, the .tflite takes {np.dtype(inputs[name]['dtype'])}")
            interpreter.resize_tensor_input(inputs[name]["index"], a.shape, strict=True)  # dynamic axes
        try:
            interpreter.allocate_tensors()
            for name, a in values.items():
                interpreter.set_tensor(inputs[name]["index"], np.ascontiguousarray(a))
            interpreter.invoke()
        except RuntimeError as e:
            # LiteRT rejects the converted graph at these shapes ("failed to prepare", also from XNNPACK
            # inside invoke) or a kernel lacks the dtype: a limit of the chain, not a wrong answer. Any
            # other error (a Gather index out of range) stays an error.
            if "failed to prepare" in str(e) or "Unsupported datatype" in str(e):
                raise Unsupported(f"does not run: {one_line(e, 200)}") from None
            raise
        return [interpreter.get_tensor(outputs[n]["index"]) for n in onnx_outputs]

    return run, f"LiteRT {litert_version} CPU, from onnx2tf {version} ({kind} .tflite)"


def run_litert(spec, model_bytes: bytes, threads: int | None = None):
    from pe_export.runtimes.graphs import first_output

    run, provider = graph_litert(model_bytes, threads, "float16" if spec.dtype == "fp16" else "float32")
    return first_output(run), provider
