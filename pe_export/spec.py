"""The export spec: everything needed to rebuild an exported graph's reference from the file alone.

Stored as JSON under the `pe_export.spec` key of the model's `metadata_props`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pe_export.dtypes import DTYPES
from pe_export.errors import BadInput

VERSION = "0.1.0"  # pe-export's version, recorded in every spec it writes (pe_export.__version__)

SPEC_KEY = "pe_export.spec"
DERIVED_KEY = "pe_export.derived"  # values computed from the spec that a runtime needs (JSON)
OP_NAMES = ("onnx", "ort", "decomposed")  # the keys of pe_export.custom_ops.lowerings.OP_TARGETS, import-free
LAYOUTS = ("bhsd", "bshd")  # where the heads axis sits in x: (B, H, S, D) or (B, S, H, D)


def check_static_shapes(shape) -> None:
    """The form only (positive integers); `check_spec` checks them against the contract and the table."""
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
    ):
        raise ValueError(f"static_shapes must be a list of integers like [1, 128], got {shape!r}")
    if any(n < 1 for n in shape):
        raise ValueError(f"--static-shapes sizes must be >= 1, got {','.join(map(str, shape))}")


@dataclass(frozen=True, kw_only=True)
class Spec:
    encoding: str
    params: dict  # the encoding's parameter dataclass, as a dict
    op: str = "onnx"  # ONNX target (see pe_export.custom_ops.lowerings.OP_TARGETS)
    opset: int = 23
    dtype: str = "fp32"  # of the float inputs, outputs and tables
    layout: str = "bhsd"
    # Fixed input sizes (batch, seq[, heads]) for runtimes that need static shapes (pe_export.encodings.static_shapes);
    # None: batch and lengths stay symbolic.
    static_shapes: list[int] | None = None
    # How the file is packaged and what was written beside it: {"external_data": bool, "format": "ort",
    # "optimize": level, "optimize_provider": "cpu"|"cuda"} (pe_export.pipeline.packaging); empty: a plain .onnx.
    deploy: dict = field(default_factory=dict)
    version: str = field(default=VERSION)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a JSON object, got {type(self.params).__name__}")
        if self.static_shapes is not None:
            check_static_shapes(self.static_shapes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise BadInput(f"the {SPEC_KEY} metadata is not a valid pe-export spec: {e}") from None
