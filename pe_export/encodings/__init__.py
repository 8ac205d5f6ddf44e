"""Positional encodings, one file each, registered by name.

An encoding is an `Encoding`: its parameter dataclass, the float64 NumPy reference, the torch module
that is exported, and the probe inputs verification feeds both. Each callable takes a `Spec`.
"""

from dataclasses import dataclass
from typing import Callable

from pe_export.registry import Registry


@dataclass(frozen=True)
class Encoding:
    name: str
    params: type  # frozen keyword-only dataclass that validates itself
    module: Callable  # spec -> torch.nn.Module in eval mode (the PyTorch original)
    example_inputs: Callable  # spec -> (args, dynamic_shapes, input_names, output_names)
    probes: Callable  # (spec, rng, batch) -> [(name, {input name: ndarray})]
    reference: Callable  # (spec, inputs) -> float64 ndarray, the truth
    translation_table: Callable  # spec -> custom_translation_table for torch.onnx.export
    positions: Callable  # inputs -> the int positions array, to say where an error sits
    scale: Callable  # (spec, inputs) -> magnitude the tolerance is relative to (max |x| times table scale)


ENCODINGS = Registry("encoding", __name__)
