"""The `torch` runtime: the PyTorch module a graph was exported from, eager on CPU, in the export dtype."""

from __future__ import annotations

import numpy as np

from pe_export.dtypes import numpy_dtype
from pe_export.encodings.attention import encoding_for
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
