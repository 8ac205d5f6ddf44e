"""Each runtime in a process of its own, with a time limit (house style, rule 23).

A runtime adapter (pe_export.runtimes) runs in a worker process, `python -m pe_export.runtimes.worker`: a fresh
interpreter that imports only what the adapter needs (and never the caller's `__main__`, which
multiprocessing's spawn would re-run). The parent sends the adapter (its module and name: a
module-level function), the spec and the model bytes once, then the probe inputs one at a time, as
pickles over the worker's stdin and stdout, and gets back the outputs or the adapter's error. A runtime that aborts,
panics or is killed by a signal (tract panics in its Gather on a position past the table and aborts
the process: "panic in a function that cannot unwind") raises `Crash` here, with the signal and the
last line its process wrote to stderr; one that does not answer within the time limit is killed and
raises `Timeout`. Every other row of a report still completes.

Workers are kept in a pool, one per runtime, and reused for every probe of a check and for later
checks in the same process (a new model is loaded into the same worker): starting one costs an
interpreter and its imports (~0.4 s here), paid once per runtime per process, not once per probe.
A worker that crashed or timed out is dropped, and the next request starts a fresh one.

Only `torch` runs in the parent process (IN_PROCESS): it is the reference the other rows compare
with, and it is the process pe-export itself runs in.
"""

from __future__ import annotations

import atexit
import os
import signal
import tempfile
import traceback

from pe_export.runtimes.outcomes import Crash, Skip, Timeout, Unsupported  # noqa: F401 (Crash, Timeout re-exported)

IN_PROCESS = frozenset({"torch"})
TIMEOUT_S = 120.0  # per request (start + load, or one probe): a hang becomes a TIMEOUT row after this


# ------------------------------------------------------------------------------------------------
# The worker side


def _serve() -> None:
    """The worker's loop (`python -m pe_export.runtimes.worker`; stderr is the parent's log file): the
    parent's sys.path, then ("load", (module, name), spec json (None for a graph adapter), model bytes,
    adapter keywords), ("run", inputs) and ("time", inputs, repeat) requests, each answered with
    (status, value)."""
    import importlib
    import sys
    from multiprocessing.connection import Connection

    conn_in, conn_out = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # nothing a runtime prints reaches the protocol's pipe: it goes to the log with stderr
    os.environ["RUST_BACKTRACE"] = "0"  # a panic's message, not pages of backtrace
    sys.path[:], adapter_module = conn_in.recv()  # the caller's path: a test's own adapters import from its folder
    from pe_export.spec import Spec

    _preload(adapter_module)

    call = None
    while True:
        try:
            request = conn_in.recv()
        except EOFError:
            return
        try:
            if request[0] == "load":
                _, (module, qualname), spec_json, model_bytes, options = request
                adapter = getattr(importlib.import_module(module), qualname)
                if hasattr(call, "close"):  # the last model's own process (ort-web's Node)
                    call.close()
                call = None
                spec = () if spec_json is None else (Spec.from_json(spec_json),)  # None: a graph adapter
                call, provider = adapter(*spec, model_bytes, **options)
                reply = ("ok", provider)
            elif request[0] == "run":
                reply = ("ok", call(request[1]))
            elif request[0] == "time":
                reply = ("ok", timer(call)(request[1], request[2]))
            else:
                reply = ("error", f"unknown request {request[0]!r}")
        except Skip as e:
            reply = ("skip", str(e))
        except Unsupported as e:
            reply = ("unsupported", str(e))
        except Crash as e:  # an adapter whose own child process died (ort-web's Node) says so
            reply = ("crash", str(e))
        except BaseException as e:  # noqa: BLE001 - every error goes back as the row's message
            reply = ("error", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            traceback.print_exc()
        conn_out.send(reply)


def _preload(module_name: str) -> None:
    """Import the adapter's module and the runtime it names in `PRELOAD` before the first request: the
    parent starts workers while it exports, so this import overlaps the export instead of following it."""
    import importlib

    try:
        module = importlib.import_module(module_name)
        for name in getattr(module, "PRELOAD", ()):
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - an absent runtime says so at "load", in its row
        pass


def timer(call):
    """`call.time(inputs, repeat) -> [seconds]` where the adapter times its runtime itself (without the
    conversions around it), else a plain timing of `call`."""
    if hasattr(call, "time"):
        return call.time

    def time_call(inputs, repeat):
        import time

        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            call(inputs)
            times.append(time.perf_counter() - t)
        return times

    return time_call


# ------------------------------------------------------------------------------------------------
# The parent side


class Worker:
    """One runtime's process. `load` the adapter with a model, then `run` inputs on it."""

    def __init__(self, name: str, adapter):
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        self.name, self.adapter = name, adapter
        fd, self.stderr_path = tempfile.mkstemp(prefix=f"pe-export-{name}-", suffix=".log")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pe_export.runtimes.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=fd,
        )
        os.close(fd)
        # Connections own their descriptors: give them copies, and close the pipe files' own.
        self.send = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.recv = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.send.send((list(sys.path), getattr(adapter, "__module__", "")))

    def alive(self) -> bool:
        return self.process.poll() is None

    def request(self, message, timeout: float):
        offset = os.path.getsize(self.stderr_path)
        try:
            self.send.send(message)
            ready = self.recv.poll(timeout)
            if ready:
                return self.recv.recv()
        except (EOFError, OSError):
            ready = True  # the process went away
        if not ready:
            self.close()
            raise Timeout(f"no answer within {timeout:g} s; the process was killed")
        try:
            self.process.wait(5)
        except Exception:
            pass
        raise Crash(self._death(offset))

    def _death(self, offset: int) -> str:
        code = self.process.poll()
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        lines = [line.strip() for line in _read_from(self.stderr_path, offset).splitlines() if line.strip()]
        self.close()
        text = f"the {self.name} process {how}"
        # A Rust panic says what went wrong on the line after "panicked at"; the last line only that it aborts.
        panic = next((i for i, line in enumerate(lines[:-1]) if "panicked at" in line), None)
        if panic is not None:
            text += f"; panicked at {lines[panic].split('panicked at')[-1].strip()} {lines[panic + 1][:200]}"
        return text + (f"; its stderr ends: {lines[-1][:300]}" if lines else "")

    def close(self):
        if self.alive():
            self.process.kill()
        self.process.wait()
        self.send.close()
        self.recv.close()
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""


_POOL: dict[tuple, Worker] = {}


def _key(name: str, adapter) -> tuple:
    return name, getattr(adapter, "__module__", ""), getattr(adapter, "__qualname__", repr(adapter))


def worker(name: str, adapter) -> Worker:
    """The pooled worker of this runtime (a new one if there is none or the last one died)."""
    key = _key(name, adapter)
    w = _POOL.get(key)
    if w is None or not w.alive():
        w = _POOL[key] = Worker(name, adapter)
    return w


def start(names, runtimes: dict) -> None:
    """Start the workers of these runtimes now, so that their interpreters start side by side."""
    for name in names:
        if name not in IN_PROCESS and name in runtimes:
            worker(name, runtimes[name])


def drop(name: str, adapter) -> None:
    w = _POOL.pop(_key(name, adapter), None)
    if w is not None:
        w.close()


@atexit.register
def shutdown() -> None:
    for key in list(_POOL):
        _POOL.pop(key).close()


def _answer(reply):

    status, value = reply
    if status == "ok":
        return value
    raise {"skip": Skip, "unsupported": Unsupported, "crash": Crash}.get(status, RuntimeError)(value)


def load(name: str, adapter, spec, model_bytes: bytes, timeout: float = TIMEOUT_S, options: dict | None = None):
    """(call, provider) like the adapter's own, with the adapter running in its worker: `call(inputs)`
    returns the output or raises the adapter's error, `Crash` or `Timeout`; `call.time(inputs, repeat)`
    returns the runtime's own timings. `options` go to the adapter as keywords (bench's `threads`).
    `spec` None loads a graph adapter (pe_export.runtimes.GRAPH_RUNTIMES: model bytes only).
    `torch` (IN_PROCESS) runs here."""
    if name in IN_PROCESS:
        return adapter(spec, model_bytes, **(options or {}))
    where = (adapter.__module__, adapter.__qualname__)  # imported by the worker: a module-level function
    if "<" in where[1]:
        raise TypeError(
            f"runtime {name!r}: an adapter runs in a worker process, which imports it; "
            f"{where[1]} is not a module-level function"
        )
    w = worker(name, adapter)
    try:
        spec_json = None if spec is None else spec.to_json()
        provider = _answer(w.request(("load", where, spec_json, model_bytes, options or {}), timeout))
    except (Crash, Timeout):
        drop(name, adapter)
        raise

    def call(inputs):
        try:
            return _answer(w.request(("run", inputs), timeout))
        except (Crash, Timeout):
            drop(name, adapter)
            raise

    def time(inputs, repeat: int):
        try:
            return _answer(w.request(("time", inputs, repeat), timeout))
        except (Crash, Timeout):
            drop(name, adapter)
            raise

    call.time = time
    return call, provider


if __name__ == "__main__":
    _serve()
