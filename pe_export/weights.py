"""Learned weights: seeded random values for trying an encoding out, or one tensor read from a
`.safetensors` file (the `safetensors` package's `safe_open`) or a torch state dict
(`torch.load(weights_only=True)`: never arbitrary unpickling).

A spec names its weights by source, never by value: `weights_seed` (regenerated anywhere), or the
file, the key and the tensor's sha256 (re-read by `pe-export verify`, which refuses a changed tensor).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pe_export.errors import BadInput, one_line

WEIGHT_FIELDS = ("weights_seed", "weights", "key", "weights_sha256")  # a learned table's source, in its parameters


@dataclass(frozen=True, kw_only=True)
class LearnedWeights:
    """The weight-source fields every learned encoding's parameters carry."""

    weights_seed: int = 0  # seeded random weights when no file is given
    weights: str | None = None  # a .safetensors file or a torch state dict
    key: str | None = None  # the tensor's name in that file
    weights_sha256: str | None = None  # of the tensor as read; set at export, checked when re-read

    def check_weights(self, supported: bool = True):
        if not isinstance(self.weights_seed, int) or self.weights_seed < 0:
            raise ValueError(f"weights_seed must be an integer >= 0, got {self.weights_seed!r}")
        if self.weights is not None and not supported:
            raise ValueError("this encoding takes seeded random weights only (--weights-seed), not --weights")
        if (self.weights is None) != (self.key is None):
            raise ValueError("--weights FILE and --key NAME go together")


def digest(a: np.ndarray) -> str:
    """sha256 of a tensor's shape and float64 values: the same for a tensor however it was stored."""
    h = hashlib.sha256(json.dumps(list(a.shape)).encode())
    h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


def random(seed: int, shapes: dict[str, tuple], scales: dict[str, float]) -> dict[str, np.ndarray]:
    """float64 N(0, scale^2) tensors, drawn in the order of `shapes` from one seeded generator."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) * scales.get(name, 1.0) for name, shape in shapes.items()}


def load(p: LearnedWeights) -> np.ndarray:
    """The tensor `p.key` of `p.weights` as float64, checked against `p.weights_sha256` when set.

    A key that names no tensor but is the prefix of some (`KEY.name`; "" for every tensor) names the
    group: a module with several tensors (FIRE's MLP). `load` then returns them flattened and joined
    in name order, so that one sha256 covers them all; `load_group` returns them by name."""
    a = _read(*_located(p), p.key)
    if p.weights_sha256 is not None and digest(a) != p.weights_sha256:
        raise BadInput(
            f"tensor {p.key!r} of {p.weights!r} is not the one this file was exported with "
            f"(sha256 {digest(a)[:12]}..., exported {p.weights_sha256[:12]}...)"
        )
    return a


def load_group(p: LearnedWeights) -> dict[str, np.ndarray]:
    """The tensors under the prefix `p.key` (see `load`), by their names after it, as float64,
    checked against `p.weights_sha256` (the digest of what `load` returns for that key)."""
    load(p)
    return dict(_group(*_located(p), p.key))


def _located(p: LearnedWeights) -> tuple[str, int, int]:
    path = Path(p.weights)
    try:
        stat = path.stat()
    except OSError:
        raise BadInput(f"weights file {p.weights!r} does not exist") from None
    if not path.is_file():
        raise BadInput(f"weights file {p.weights!r} is not a file")
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _tensors(path: str) -> dict:
    return _safetensors(path) if path.endswith(".safetensors") else _state_dict(path)


@functools.lru_cache(maxsize=8)
def _group(path: str, mtime_ns: int, size: int, key: str) -> tuple:
    """((name after the prefix, float64 tensor), ...) in name order, for every tensor under `key`."""
    prefix = key if key == "" or key.endswith(".") else key + "."
    tensors = _tensors(path)
    group = []
    for name in sorted(n for n in tensors if n.startswith(prefix)):
        a = tensors[name]()
        if not np.all(np.isfinite(a)):
            raise BadInput(f"tensor {name!r} of {path!r} holds NaN or infinite values")
        a.setflags(write=False)
        group.append((name[len(prefix) :], a))
    return tuple(group)


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int, key: str) -> np.ndarray:
    tensors = _tensors(path)
    if key not in tensors and _group(path, mtime_ns, size, key):
        a = np.concatenate([t.ravel() for _, t in _group(path, mtime_ns, size, key)])
        a.setflags(write=False)
        return a
    if key not in tensors:
        names = sorted(tensors)
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise BadInput(f"weights file {path!r} has no tensor {key!r}; it has: {shown or 'none'}")
    a = tensors[key]()
    if not np.all(np.isfinite(a)):
        raise BadInput(f"tensor {key!r} of {path!r} holds NaN or infinite values")
    a.setflags(write=False)
    return a


def _safetensors(path: str) -> dict:
    """The tensors of a `.safetensors` file, each read on its own when called (`safe_open` maps the file:
    one tensor is read without loading the others)."""
    from safetensors import SafetensorError, safe_open

    bad = f"weights file {path!r} is not a valid .safetensors file"
    try:
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{bad} ({one_line(e, 160)})") from None

    def reader(name):
        def read():
            import torch

            try:
                with safe_open(path, framework="pt") as f:
                    t = f.get_tensor(name)
            except (SafetensorError, OSError, ValueError, TypeError) as e:
                raise BadInput(f"{bad} (tensor {name!r}: {one_line(e, 160)})") from None
            if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
                raise BadInput(
                    f"tensor {name!r} of {path!r} has dtype {str(t.dtype).removeprefix('torch.')}; want a float or "
                    f"signed integer"
                )
            return t.to(torch.float64).numpy()

        return read

    return {name: reader(name) for name in names}


def _state_dict(path: str) -> dict:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # its warnings about odd pickles would add lines to a one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"weights file {path!r} is not a .safetensors file or a torch state dict ({first})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"weights file {path!r} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return {k: (lambda t=t: t.detach().to(torch.float64).numpy()) for k, t in tensors.items()}
