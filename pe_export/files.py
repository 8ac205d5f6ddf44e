"""Files: one-line errors for paths, an atomic write that never leaves half a file or overwrites
silently, and quiet logging around the tools that write them."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from pe_export.errors import BadInput


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


def write_atomic(data: bytes, path: Path, force: bool) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    check_output_path(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        if not force and path.exists():
            raise BadInput(f"{str(path)!r} appeared while exporting; pass --force to overwrite it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
