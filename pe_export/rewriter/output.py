"""The rewritten model's files, written through `files.staged` (the one atomic writer).

A small model is one file. A large one (`copies.is_large`) is the model and its external data,
`OUT.onnx.data` beside it, laid out as the original's: the original's external data is copied by the
kernel (`os.copy_file_range`, as `cp` copies), in a thread that starts as soon as the original is
loaded, so that the copy overlaps the rewrite and its checks instead of following them. The tensors
the rewrite made (its tables) follow the copy. Each original tensor keeps its offset within its run of
tensors, and a run starts at its old offset modulo `ALIGN`, so a tensor the original aligned for memory
mapping stays aligned. The bytes of the constants the rewrite replaced (the graph's float32 inv_freq,
a fused node's old caches) stay in the file unread, as in a `cp` of the model.

    with Output(path, force, original) as out:  # the copy of the original's external data starts
        result = rewrite_model(original, config)
        out.write(result.model)  # waits for the copy, writes the rest, places the files
"""

from __future__ import annotations

import bisect
import errno
import os
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import onnx_ir as ir

from pe_export.files import staged
from pe_export.rewriter.copies import is_large

ALIGN = 65536  # a run of the original's tensors starts at its old offset modulo this (Windows maps at 64 KiB)
THRESHOLD = 256  # bytes: larger tensors go to the external data (onnx_ir's default, as `ir.save` wrote before)
CHUNK = 64 * 2**20  # bytes per kernel copy: a stop request waits for one chunk at most
FLUSH = 256 * 2**20  # bytes written between two hand-overs to the disk (`_copy_range`)


class Run(NamedTuple):
    """Bytes [start, end) of the original's external data file `source`, at `at` in the output's."""

    source: str
    start: int
    end: int
    at: int


def layout(model: ir.Model) -> list[Run]:
    """The runs of the model's external data in the output's data file: each file's tensors in offset
    order, neighbours less than ALIGN apart in one run (the padding between them copied too)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for t in _external(model):
        start = t.offset or 0
        spans.setdefault(t.path, []).append((start, start + _length(t)))
    runs, at = [], 0
    for source, found in spans.items():
        merged: list[list[int]] = []
        for start, end in sorted(found):
            if merged and start <= merged[-1][1] + ALIGN:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            at += (start - at) % ALIGN
            runs.append(Run(source, start, end, at))
            at += end - start
    return runs


class Output:
    """The files of `path`, model and (for a large model) its external data; nothing is placed before
    `write`, and on any failure before it, nothing is left behind. `flush`: hand the copied bytes to the
    disk as they are written, for a caller that allocates gigabytes while or after they are (the checks'
    ONNX Runtime sessions): gigabytes of dirty pages waiting made a 1 GiB allocation take 2.4 s instead of
    0.14 s here. A plain rewrite leaves them to the kernel, as `cp` does."""

    def __init__(self, path: Path | str, force: bool, original: ir.Model, flush: bool = False):
        self.path, self.force, self.flush = Path(path), force, flush
        self.runs = layout(original) if is_large(original) else []
        self.data: Path | None = None  # the copy under way, a temporary file beside `path`
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = None
        if self.runs:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
            os.close(fd)
            self.data = Path(name)
            self.thread = threading.Thread(target=self._copy, name="pe-export-copy", daemon=True)
            self.thread.start()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the copy if it is still running and remove what was not placed."""
        self._join(stop=True)
        if self.data is not None:
            self.data.unlink(missing_ok=True)
            self.data = None

    def write(self, model: ir.Model) -> None:
        """Write `model` (the rewrite of the original) and place its files; `model` is left unchanged."""
        if not is_large(model):
            with staged([self.path], self.force) as folder:
                ir.save(model, folder / self.path.name)
            return
        side = self.path.with_name(f"{self.path.name}.data")
        self._join(stop=False)
        if self.data is None:  # nothing copied before (a model made large by the rewrite's own tensors)
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
            os.close(fd)
            self.data = Path(name)
        placed = _by_source(self.runs)
        end = max((r.at + r.end - r.start for r in self.runs), default=0)
        kept = []  # (value, its own tensor), put back at the end
        try:
            with open(self.data, "r+b") as out:
                for value in (v for g in model.graphs() for v in g.initializers.values()):
                    t = value.const_value
                    if t is None or t.nbytes <= THRESHOLD:
                        if isinstance(t, ir.ExternalTensor):  # small external tensors go into the model itself
                            kept.append((value, t))
                            value.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)
                        continue
                    at = _offset(t, placed)
                    if at is None:  # the rewrite's own tensors (or one outside the copied runs): appended
                        at = end = end + (-end) % (ALIGN if _length(t) >= ALIGN else 16)
                        _write(t, out, at)
                        end += _length(t)
                    kept.append((value, t))
                    value.const_value = ir.ExternalTensor(
                        side.name, at, _length(t), t.dtype, shape=t.shape, name=t.name, base_dir=str(self.path.parent)
                    )
            with staged([self.path, side], self.force) as folder:
                os.replace(self.data, folder / side.name)
                self.data = None
                ir.save(model, folder / self.path.name)
        finally:
            for value, t in kept:
                value.const_value = t

    def _join(self, stop: bool) -> None:
        if self.thread is not None:
            if stop:
                self.stop.set()
            self.thread.join()
            self.thread = None
        if self.error is not None and not stop:
            raise self.error

    def _copy(self) -> None:
        """The thread: every run from its source into the temporary data file."""
        try:
            with open(self.data, "r+b") as out:
                for run in self.runs:
                    with open(run.source, "rb") as src:
                        size = run.end - run.start
                        _copy_range(src.fileno(), out.fileno(), run.start, run.at, size, self.stop, self.flush)
                    if self.stop.is_set():
                        return
        except BaseException as e:  # raised by `write`
            self.error = e


def _external(model: ir.Model):
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def _length(t) -> int:
    return t.length if isinstance(t, ir.ExternalTensor) and t.length is not None else t.nbytes


def _by_source(runs: list[Run]) -> dict[str, tuple[list[int], list[Run]]]:
    """source -> (its runs' starts, its runs), in offset order."""
    out: dict[str, tuple[list[int], list[Run]]] = {}
    for run in runs:
        starts, found = out.setdefault(run.source, ([], []))
        starts.append(run.start)
        found.append(run)
    return out


def _offset(t, placed: dict) -> int | None:
    """Where the copy put the external tensor `t`, None if it is not in a run."""
    if not isinstance(t, ir.ExternalTensor) or t.path not in placed:
        return None
    starts, runs = placed[t.path]
    start = t.offset or 0
    i = bisect.bisect_right(starts, start) - 1
    if i < 0 or start + _length(t) > runs[i].end:
        return None
    return runs[i].at + start - runs[i].start


def _write(t, out, at: int) -> None:
    if isinstance(t, ir.ExternalTensor):
        with open(t.path, "rb") as src:
            _copy_range(src.fileno(), out.fileno(), t.offset or 0, at, _length(t), threading.Event(), False)
    else:
        os.pwrite(out.fileno(), t.tobytes(), at)


def _copy_range(src: int, dst: int, start: int, at: int, length: int, stop: threading.Event, flush: bool) -> None:
    """`length` bytes of `src` from `start` to `dst` at `at`: in the kernel where it can, else read and
    written in chunks; returns early when `stop` is set. With `flush`, every FLUSH bytes the written
    range is handed to the disk (`posix_fadvise` DONTNEED starts its writeback and lets its pages go)."""
    done = flushed = 0
    kernel = hasattr(os, "copy_file_range")
    while done < length and not stop.is_set():
        n = min(CHUNK, length - done)
        if kernel:
            try:
                n = os.copy_file_range(src, dst, n, start + done, at + done)
            except OSError as e:  # another file system, or a kernel without it: copy through memory
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                kernel = False
                continue
        else:
            chunk = os.pread(src, n, start + done)
            n = len(chunk) and os.pwrite(dst, chunk, at + done)
        if n == 0:
            raise OSError(f"external data ends before byte {start + length} (at {start + done})")
        done += n
        if flush and (done - flushed >= FLUSH or done == length) and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(dst, at + flushed, done - flushed, os.POSIX_FADV_DONTNEED)
            flushed = done
