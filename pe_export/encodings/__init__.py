"""Positional encodings, one file each, registered by name.

An encoding is an `Encoding`: its parameter dataclass, the float64 NumPy reference, the torch module
that is exported, and the probe inputs verification feeds both. Each callable takes a `Spec`.
"""

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

from pe_export.registry import Registry

KINDS = ("absolute", "bias", "attention", "rotary", "mrotary")  # the graph contracts of pe_export.encodings.common


@functools.lru_cache(maxsize=1024)
def _parsed(cls, params_json: str):
    return cls(**json.loads(params_json))


def parse(cls, spec):
    """`cls(**spec.params)`, built and validated once per distinct parameters: every callable of an
    encoding asks for its parameters through here, so a spec is parsed once however many ask. The
    parameter dataclasses are frozen, so the one instance is shared safely."""
    return _parsed(cls, json.dumps(spec.params, sort_keys=True))


def nothing(spec) -> dict:
    """The default of `translation_table` (no custom op to lower) and `derived` (nothing to store)."""
    return {}


@dataclass(frozen=True)
class Encoding:
    name: str
    params: type  # frozen keyword-only dataclass that validates itself
    module: Callable  # spec -> torch.nn.Module in eval mode (the PyTorch original)
    example_inputs: Callable  # spec -> (args, dynamic_shapes, input_names, output_names)
    probes: Callable  # (spec, rng, batch) -> [(name, {input name: ndarray})]
    reference: Callable  # (spec, inputs) -> float64 ndarray, the truth
    magnitude: Callable  # (spec, inputs) -> per-output-element magnitude the rounding bound scales with
    locate: Callable  # (spec, inputs, index into the output) -> "batch b, position p, dim d"
    translation_table: Callable = nothing  # spec -> custom_translation_table for torch.onnx.export
    derived: Callable = nothing  # spec -> {name: value} a runtime needs besides the graph (stored as pe_export.derived)
    kind: str = "absolute"  # one of KINDS
    ops: tuple = ("decomposed",)  # the ONNX targets it lowers to (pe_export.custom_ops.lowerings.OP_TARGETS)
    layouts: tuple = ("bhsd",)  # of its 4D inputs
    reference_impl: str = ""  # the published implementation it is checked against (docs/encodings.md, `pe-export list`)
    attention_scale: bool = True  # bias encodings: whether the attention layer scales q.k by 1/sqrt(D)

    def parse(self, spec):
        """This encoding's parameters of `spec` (see `parse`)."""
        return parse(self.params, spec)


ENCODINGS = Registry("encoding", __name__)
