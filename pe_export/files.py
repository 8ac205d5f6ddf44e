"""Files: one-line errors for paths, the one atomic writer (a file, or a model and its side files, that
never leaves half a file or overwrites silently), the one external-data threshold, and quiet logging
around the tools that write them."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from pe_export.errors import BadInput

# Above this many bytes of weights a model is written with external data (one protobuf holds at most
# 2 GiB; the exporter and the rewriter both use this one threshold).
EXTERNAL_DATA_THRESHOLD = 2**30


@contextlib.contextmanager
def quiet_logging():
    """The exporter and the version converter log warnings about their internals; errors still show."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def check_output_path(path: Path, force: bool) -> None:
    if not path.parent.is_dir():
        raise BadInput(f"output folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise BadInput(f"output path {str(path)!r} is a folder")
    if path.exists() and not force:
        raise BadInput(f"{str(path)!r} exists; pass --force to overwrite it")


@contextlib.contextmanager
def staged(paths: list[Path], force: bool):
    """The one atomic writer. Yields a temporary folder beside `paths` (all in one folder); the caller
    writes each file there under its final name. Then each is renamed into place, the side files
    (`paths[1:]`) before the main one, so a reader never sees the main file without them. Nothing is
    overwritten without `force`; on any failure nothing is left behind (a side file renamed before the
    failure is removed again unless it existed before)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_output_path(path, force)
    with tempfile.TemporaryDirectory(prefix=f".{paths[0].name}.", dir=paths[0].parent) as tmp:
        yield Path(tmp)
        for path in paths:
            os.chmod(Path(tmp) / path.name, 0o644)
        if not force and any(path.exists() for path in paths):
            appeared = " or ".join(repr(str(p)) for p in paths)
            raise BadInput(f"{appeared} appeared while writing; pass --force to overwrite")
        placed = []
        try:
            for path in [*paths[1:], paths[0]]:
                existed = path.exists()
                os.replace(Path(tmp) / path.name, path)
                placed.append((path, existed))
        except BaseException:
            for path, existed in placed:
                if not existed:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            raise


def write_atomic(data: bytes, path: Path, force: bool) -> None:
    """Write `data` to `path` through `staged`: readers never see half a file."""
    with staged([path], force) as folder:
        (folder / Path(path).name).write_bytes(data)


def read_file(path: Path) -> bytes:
    """The bytes of `path`, with one-line errors for a missing path, a folder and an empty file."""
    if not path.exists():
        raise BadInput(f"{str(path)!r} does not exist")
    if not path.is_file():
        raise BadInput(f"{str(path)!r} is not a file")
    data = path.read_bytes()
    if not data:
        raise BadInput(f"{str(path)!r} is empty")
    return data


def not_onnx(path: Path, e: Exception) -> BadInput:
    """The error for a file onnx cannot parse or check (protobuf's and onnx's errors share no base)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BadInput(f"{str(path)!r} is not a valid ONNX model ({first})")
