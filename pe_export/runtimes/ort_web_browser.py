"""The `ort-web-browser` runtime: onnxruntime-web in a real page of headless Chromium (js/browser/).

The same pinned onnxruntime-web as `ort-web` (js/node_modules, `npm ci --prefix js`), run by a browser
instead of Node: Debian's `chromium` (`apt-get install chromium`; PE_EXPORT_CHROMIUM names another
binary), started headless with `--remote-debugging-pipe`, so the DevTools protocol runs over two pipes
(fds 3 and 4, NUL-separated JSON) and no port is opened for it. A local HTTP server (127.0.0.1, a free
port, a thread of this process) serves the page, onnxruntime-web's dist/ files and a temporary folder
with the model, the inputs (raw files) and the output (the page PUTs it back). Nothing is downloaded:
every file comes from this machine. The server sends COOP/COEP headers so the page is cross-origin
isolated (SharedArrayBuffer: WASM threads; performance.now() at 5 us).

Two runtimes: `ort-web-browser` runs the WASM backend; `ort-web-browser-webgpu` the WebGPU backend when
`navigator.gpu.requestAdapter()` returns an adapter (Chromium is started with `--enable-unsafe-webgpu`:
WebGPU is off by default on Linux), and skips saying what requestAdapter said when it does not. Its
provider names the adapter: without a GPU, Chromium offers SwiftShader, its own Vulkan on the CPU (a
"fallback" adapter) without shader-f16, so fp16 graphs are "unsupported" there. Nodes without a WebGPU
kernel run on WASM inside the same session (ORT's own partitioning), as in any browser.

One browser per worker process, one page (tab) per loaded model. The browser exits with the worker:
its debugging pipe closes, and the kernel sends it SIGKILL when the worker dies (PR_SET_PDEATHSIG);
its profile and the pages' files live in TMPDIR/pe-export-browser-PID, removed by a later process.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from pe_export.runtimes.graphs import in_memory
from pe_export.runtimes.ort_web import DTYPES, JS_DIR, read_output, write_inputs
from pe_export.runtimes.outcomes import Crash, Skip, Unsupported
from pe_export.spec import Spec

PAGE_DIR = JS_DIR / "browser"
DIST_DIR = JS_DIR / "node_modules" / "onnxruntime-web" / "dist"
THREADS = 1  # verify: one WASM thread, as ort-web (bench passes its own)
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--remote-debugging-pipe",
    "--enable-unsafe-webgpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--mute-audio",
]
TYPES = {".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}


def chromium() -> str:
    named = os.environ.get("PE_EXPORT_CHROMIUM")
    found = shutil.which(named) if named else shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        where = f"PE_EXPORT_CHROMIUM={named} is not an executable" if named else "chromium is not installed"
        raise Skip(f"{where} (apt-get install chromium: Debian's package, ~400 MB)")
    if not (DIST_DIR / "ort.wasm.min.mjs").is_file():
        raise Skip(f"onnxruntime-web is not installed: run `npm ci --prefix {JS_DIR}`")
    return found


# ------------------------------------------------------------------------------------------------
# The local server: /page/ (js/browser), /ort/ (onnxruntime-web's dist), /data/ (the model and arrays)


def _handler(roots: dict[str, Path], writable: str):
    class Handler(BaseHTTPRequestHandler):
        def _file(self) -> Path | None:
            prefix, _, rest = self.path.split("?")[0].lstrip("/").partition("/")
            root = roots.get(prefix)
            if root is None:
                return None
            path = (root / rest).resolve()
            return path if path.is_relative_to(root.resolve()) else None

        def _headers(self, code: int, length: int, kind: str = "application/octet-stream"):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(length))
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")  # cross-origin isolated: WASM threads
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()

        def do_GET(self):
            path = self._file()
            if path is None or not path.is_file():
                self._headers(404, 0)
                return
            data = path.read_bytes()
            self._headers(200, len(data), TYPES.get(path.suffix, "application/octet-stream"))
            self.wfile.write(data)

        def do_PUT(self):
            path = self._file()
            if path is None or not self.path.startswith(f"/{writable}/"):
                self._headers(403, 0)
                return
            path.write_bytes(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self._headers(204, 0)

        def log_message(self, *args):  # quiet: the worker's stderr is the parent's log
            pass

    return Handler


def serve(roots: dict[str, Path], writable: str) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 (a free port) in a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(roots, writable))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ------------------------------------------------------------------------------------------------
# The browser, over the DevTools protocol on a pipe


def _die_with_parent():  # in the child before exec: SIGKILL when the process that started it dies
    import ctypes
    import fcntl
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # The pipe ends go to fds 3 and 4, where Chromium looks for them; copied above both first, so
    # that neither is overwritten by the other's move.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in _die_with_parent.fds]
    os.dup2(high[0], 3)
    os.dup2(high[1], 4)


SCRATCH_PREFIX = "pe-export-browser-"


@functools.cache
def scratch() -> Path:
    """This process's folder for the browser profile and the pages' files (TMPDIR/pe-export-browser-PID).
    A worker is killed (SIGKILL) when its pool shuts down, so nothing of it runs at exit: the first
    browser of a process removes the folders of processes that are gone."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(SCRATCH_PREFIX + "*"):
        pid = old.name.removeprefix(SCRATCH_PREFIX)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    root = base / f"{SCRATCH_PREFIX}{os.getpid()}"
    root.mkdir(exist_ok=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Browser:
    """A headless Chromium whose DevTools protocol runs over fds 3 (commands in) and 4 (replies out)."""

    def __init__(self, binary: str):
        self.path = binary
        self.profile = tempfile.TemporaryDirectory(
            prefix="chromium-", dir=scratch(), ignore_cleanup_errors=True
        )  # chromium may still write there
        cmd_r, self.cmd_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        _die_with_parent.fds = (cmd_r, reply_w)
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=_die_with_parent,
        )
        os.close(cmd_r)
        os.close(reply_w)
        self.buffer, self.next_id, self.events = b"", 0, []
        self.version = self.send("Browser.getVersion")["product"]  # e.g. Chrome/156.0.8078.114

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _message(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.reply_r, 1 << 20)
            if not chunk:
                code = self.proc.wait()
                how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                raise Crash(f"chromium {how}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(line)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """One command; its result, or RuntimeError with the protocol's error. A page that crashes
        while it runs is a Crash."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self.cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if reply.get("method") in ("Inspector.targetCrashed", "Target.targetCrashed"):
                raise Crash("chromium's page (renderer process) crashed")
            if reply.get("method") == "Runtime.exceptionThrown":
                self.events.append(reply["params"]["exceptionDetails"].get("text", ""))

    def close(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.reply_r)
        self.profile.cleanup()


_BROWSER: Browser | None = None


def browser() -> Browser:
    """This process's browser, started on first use (and again if it died, or if PE_EXPORT_CHROMIUM now
    names another binary: chromium() is asked every time, so an absent one is a Skip)."""
    global _BROWSER
    path = chromium()
    if _BROWSER is None or not _BROWSER.alive() or _BROWSER.path != path:
        _BROWSER = Browser(path)
    return _BROWSER


class PageSession:
    """One tab holding one onnxruntime-web session, its model and arrays in a folder of its own."""

    def __init__(self, model_bytes: bytes, threads: int, backend: str, float16: bool):
        self.browser = browser()
        self.tmp = tempfile.TemporaryDirectory(prefix="page-", dir=scratch())
        Path(self.tmp.name, "model.onnx").write_bytes(model_bytes)
        self.server = serve({"page": PAGE_DIR, "ort": DIST_DIR, "data": Path(self.tmp.name)}, writable="data")
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.target = self.browser.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.browser.send("Target.attachToTarget", targetId=self.target, flatten=True)["sessionId"]
        for domain in ("Inspector.enable", "Runtime.enable", "Page.enable"):
            self.browser.send(domain, self.session)
        self.browser.send("Page.navigate", self.session, url=f"{self.base}/page/index.html")
        self._wait_for_page()
        first = self.call(
            "load",
            {"model": f"{self.base}/data/model.onnx", "backend": backend, "threads": threads, "float16": float16},
        )
        if "provider" not in first:
            self.close()
        if "skip" in first:
            raise Skip(first["skip"])
        if "unsupported" in first:
            raise Unsupported(f"cannot load: {first['unsupported']}")
        if "error" in first:
            raise Unsupported(f"cannot load: {' '.join(first['error'].split())[:300]}")
        self.provider = first["provider"]

    def _wait_for_page(self, tries: int = 200):
        import time

        for _ in range(tries):  # page.mjs sets window.pe once the module has run
            if self.evaluate("typeof window.pe") == "object":
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"the page never defined window.pe{'; ' + self.browser.events[-1] if self.browser.events else ''}"
        )

    def evaluate(self, expression: str):
        result = self.browser.send(
            "Runtime.evaluate", self.session, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def call(self, op: str, request: dict) -> dict:
        return self.evaluate(f"window.pe.{op}({json.dumps(request)})")

    def _inputs(self, inputs: dict) -> list[dict]:
        files = write_inputs(Path(self.tmp.name), inputs)
        for f in files:  # the page fetches them from /data/
            f["url"] = f"{self.base}/data/{Path(f.pop('path')).name}"
        return files

    def _checked(self, reply: dict) -> dict:
        if "error" in reply:
            raise RuntimeError(" ".join(reply["error"].split())[:300])
        return reply

    def __call__(self, inputs: dict) -> np.ndarray:
        out = Path(self.tmp.name, "out.bin")
        out.unlink(missing_ok=True)
        return read_output(
            out, self._checked(self.call("run", {"inputs": self._inputs(inputs), "out": f"{self.base}/data/out.bin"}))
        )

    def run_all(self, inputs: dict) -> list[np.ndarray]:
        """Every output, in the graph's order and dtype."""
        reply = self._checked(
            self.call("run", {"inputs": self._inputs(inputs), "out": f"{self.base}/data/out", "all": True})
        )
        return [
            np.frombuffer(Path(self.tmp.name, f"out.{i}").read_bytes(), dtype=DTYPES[o["dtype"]]).reshape(o["shape"])
            for i, o in enumerate(reply["outputs"])
        ]

    def time(self, inputs: dict, repeat: int) -> list[float]:
        return self._checked(self.call("time", {"inputs": self._inputs(inputs), "repeat": repeat}))["times"]

    def close(self):
        if self.browser.alive():
            try:
                self.browser.send("Target.closeTarget", targetId=self.target)
            except (Crash, RuntimeError):
                pass
        self.server.shutdown()
        self.server.server_close()
        self.tmp.cleanup()


def graph_session(model_bytes: bytes, threads: int = THREADS, backend: str = "wasm"):
    """(run, provider) for any graph: `run(inputs)` returns every output (pe_export.runtimes.GRAPH_RUNTIMES)."""
    model_bytes = in_memory(model_bytes)  # a path (a large model): read in, if under 2 GiB
    import onnx

    graph = onnx.load_from_string(model_bytes).graph
    float16 = 10 in {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}  # 10: FLOAT16
    s = PageSession(model_bytes, threads, backend, float16)

    def run(inputs):
        return s.run_all(inputs)

    run.close = s.close  # the worker closes the last model's page before loading the next
    return run, s.provider


def session(spec: Spec, model_bytes: bytes, threads: int = THREADS, backend: str = "wasm"):
    """(call, provider) of the ort-web-browser adapters (`backend` "wasm" or "webgpu"); `call.time(inputs,
    repeat)` times the runs in the page."""
    if spec.dtype == "bf16":
        raise Skip("onnxruntime-web has no bfloat16 tensors")
    s = PageSession(model_bytes, threads, backend, spec.dtype == "fp16")
    return s, s.provider


def graph_ort_web_browser(model_bytes: bytes, threads: int = 1):
    return graph_session(model_bytes, threads, "wasm")


def graph_ort_web_browser_webgpu(model_bytes: bytes, threads: int = 1):
    return graph_session(model_bytes, threads, "webgpu")


def run_ort_web_browser(spec: Spec, model_bytes: bytes, threads: int = 1):
    return session(spec, model_bytes, threads, "wasm")


def run_ort_web_browser_webgpu(spec: Spec, model_bytes: bytes, threads: int = 1):
    return session(spec, model_bytes, threads, "webgpu")
