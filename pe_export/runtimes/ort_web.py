"""The `ort-web` runtime: onnxruntime-web's WASM backend, run by Node (js/ort_web.mjs).

The JavaScript side is pinned in js/package.json and js/package-lock.json and installed by
`npm ci --prefix js` (the README's set-up command); nothing is downloaded at run time. One Node process
per loaded model, talking one JSON line per request over its stdin/stdout; arrays go through raw files
in a temporary folder (int64 as BigInt64Array, float16 as its bits). The folder can be moved with
PE_EXPORT_JS (the folder holding ort_web.mjs and node_modules).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from pe_export.spec import Spec

JS_DIR = Path(os.environ.get("PE_EXPORT_JS", Path(__file__).resolve().parents[2] / "js"))
DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "float64": np.float64,
    "uint8": np.uint8,
}
THREADS = 1  # verify: one WASM thread (bench passes its own)


def write_inputs(folder: Path, inputs: dict) -> list[dict]:
    """Each input as a raw file in `folder` (in0.bin, ...): [{name, dtype, shape, path}], dtype as
    onnxruntime-web names it."""
    files = []
    for i, (name, a) in enumerate(inputs.items()):
        a = np.ascontiguousarray(a)
        dtype = next((k for k, v in DTYPES.items() if np.dtype(v) == a.dtype), None)
        if dtype is None:
            raise TypeError(f"onnxruntime-web takes no {a.dtype} input here ({name})")
        path = folder / f"in{i}.bin"
        path.write_bytes(a.tobytes())
        files.append({"name": name, "dtype": dtype, "shape": list(a.shape), "path": str(path)})
    return files


def read_output(path: Path, reply: dict) -> np.ndarray:
    """The output the JavaScript side wrote to `path` as raw bytes, its dtype and shape in `reply`, as float64."""
    data = np.frombuffer(path.read_bytes(), dtype=DTYPES[reply["dtype"]])
    return data.reshape(reply["shape"]).astype(np.float64)


class NodeSession:
    """A Node process holding one onnxruntime-web session."""

    def __init__(self, model_bytes: bytes, threads: int):
        from pe_export.runtimes.outcomes import Skip, Unsupported

        node = shutil.which("node")
        if node is None:
            raise Skip("node is not on PATH (ort-web runs onnxruntime-web under Node 20+)")
        if not (JS_DIR / "node_modules" / "onnxruntime-web").is_dir():
            raise Skip(f"onnxruntime-web is not installed: run `npm ci --prefix {JS_DIR}`")
        self.tmp = tempfile.TemporaryDirectory(prefix="pe-export-ort-web-")
        model = Path(self.tmp.name) / "model.onnx"
        model.write_bytes(model_bytes)
        self.proc = subprocess.Popen(
            [node, str(JS_DIR / "ort_web.mjs"), str(model), str(threads)],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = self._reply()
        if "error" in first:
            self.close()
            raise Unsupported(f"cannot load: {' '.join(first['error'].split())[:300]}")
        self.provider = first["provider"]

    def _reply(self) -> dict:
        from pe_export.runtimes.outcomes import Crash

        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            err = [v for v in self.proc.stderr.read().splitlines() if v.strip()]
            how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise Crash(f"node {how}" + (f"; its stderr ends: {err[-1][:300]}" if err else ""))
        return json.loads(line)

    def _request(self, inputs: dict, **request) -> dict:
        files = write_inputs(Path(self.tmp.name), inputs)
        self.proc.stdin.write(json.dumps({**request, "inputs": files}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(" ".join(reply["error"].split())[:300])
        return reply

    def run_all(self, inputs: dict) -> list[np.ndarray]:
        """Every output, in the graph's order and dtype."""
        out = Path(self.tmp.name) / "out"
        reply = self._request(inputs, op="run", out=str(out))
        return [
            np.frombuffer(Path(f"{out}.{i}").read_bytes(), dtype=DTYPES[o["dtype"]]).reshape(o["shape"])
            for i, o in enumerate(reply["outputs"])
        ]

    def __call__(self, inputs: dict) -> np.ndarray:
        return self.run_all(inputs)[0].astype(np.float64)

    def time(self, inputs: dict, repeat: int) -> list[float]:
        return self._request(inputs, op="time", repeat=repeat)["times"]

    def __del__(self):
        if getattr(self, "proc", None) is not None:
            self.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.tmp.cleanup()


def session(spec: Spec, model_bytes: bytes, threads: int = THREADS):
    """(call, provider) of the ort-web adapter; `call.time(inputs, repeat)` times the runs inside Node."""
    from pe_export.runtimes.outcomes import Skip

    if spec.dtype == "bf16":
        raise Skip("onnxruntime-web's WASM backend has no bfloat16 tensors")
    s = NodeSession(model_bytes, threads)
    return s, s.provider


def graph_ort_web(model_bytes: bytes, threads: int = 1):
    from pe_export.runtimes.graphs import in_memory

    model_bytes = in_memory(model_bytes)  # a path (a large model): read in, if under 2 GiB
    s = NodeSession(model_bytes, threads)
    return s.run_all, s.provider


def run_ort_web(spec: Spec, model_bytes: bytes, threads: int = 1):
    return session(spec, model_bytes, threads)
