"""The one tolerance table: each (dtype, op target) bound with its reason, and the per-element bound

    factor * (eps(dtype) * magnitude + denorm_min(dtype))

where `magnitude` comes from the encoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_export.dtypes import DENORM_MIN, EPS
from pe_export.encodings.attention import encoding_for
from pe_export.spec import OP_NAMES, Spec


@dataclass(frozen=True)
class Tolerance:
    factor: float
    reason: str


_ROUNDING = (
    "an output a*c - b*s (or b*c + a*s) rounds the tables, the two products and the sum, each by at most "
    "eps/2 relative: at most 1.5 eps * F * (|a| + |b|) to first order, bounded here by 2; results in the "
    "subnormal range add at most half a subnormal spacing per operation. Table reads (absolute, bias) "
    "round once; attention layers bring their own magnitude (encodings.common.attention_magnitude)"
)


_TARGETS = {
    "onnx": "the opset-23 RotaryEmbedding kernel: one product pair and a sum per element",
    "ort": "com.microsoft::RotaryEmbedding: the same arithmetic as the standard op",
    "decomposed": "plain Mul/Add/Sub on gathered tables: the same roundings, in the graph",
}


_DTYPES = {
    "fp32": "",
    "fp16": "; kernels that compute in fp32 inside land well under it",
    "bf16": "; bf16 keeps 8 significant bits, so eps = 2^-7",
}


# (dtype, op target) -> bound. Every entry has the same factor: the arithmetic each target performs
# is the same up to the order of two roundings, so no target is given slack another does not get.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    (dtype, op): Tolerance(2.0, f"{_ROUNDING}{_DTYPES[dtype]}; {op}: {_TARGETS[op]}")
    for dtype in _DTYPES
    for op in OP_NAMES
}


def tolerance(dtype: str, op: str) -> Tolerance:
    return TOLERANCES[(dtype, op)]


# The check


def bound(spec: Spec, inputs: dict) -> np.ndarray:
    """The per-element error bound of the output for `inputs`: factor * (eps * magnitude + denorm_min)."""
    magnitude = encoding_for(spec).magnitude(spec, inputs)
    return tolerance(spec.dtype, spec.op).factor * (EPS[spec.dtype] * magnitude + DENORM_MIN[spec.dtype])
