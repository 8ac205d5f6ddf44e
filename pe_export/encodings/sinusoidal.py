"""Sinusoidal absolute position encoding (Vaswani et al. 2017, "Attention Is All You Need", §3.5).

Three layouts that real code uses and that are not interchangeable (`layout_variant`):
  interleaved     the paper: PE[p, 2i] = sin(p * w_i), PE[p, 2i + 1] = cos(p * w_i), w_i = base^(-2i/dim).
                  Must match transformers 5.23 `modeling_distilbert.create_sinusoidal_embeddings`.
  concat          [sin(p * w) | cos(p * w)] with the same w: Transformer-XL's `PositionalEmbedding`
                  (kimiyoung/transformer-xl pytorch/mem_transformer.py); transformers 5.23 XLNet's
                  `positional_embedding` is the same formula.
  tensor2tensor   [sin | cos] with w_i = exp(-i * ln(base) / (dim/2 - 1)), zero column for odd dim:
                  tensor2tensor `get_timing_signal_1d`, fairseq `SinusoidalPositionalEmbedding.get_embedding`;
                  transformers 5.23 `M2M100SinusoidalPositionalEmbedding.get_embedding`.

The table is computed in float64 at export time and cast once; the graph is one guarded Gather.
fairseq's padding offset is the caller's: pass positions + padding_idx + 1 and a table that long.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_export.encodings import ENCODINGS
from pe_export.encodings.contracts import table_encoding
from pe_export.encodings.size import check_size

VARIANTS = ("interleaved", "concat", "tensor2tensor")


@dataclass(frozen=True, kw_only=True)
class SinusoidalParams:
    dim: int
    base: float = 10000.0
    layout_variant: str = "interleaved"
    max_positions: int = 2048

    def __post_init__(self):
        if self.layout_variant not in VARIANTS:
            raise ValueError(f"layout_variant must be one of {', '.join(VARIANTS)}, got {self.layout_variant!r}")
        smallest = 4 if self.layout_variant == "tensor2tensor" else 2  # t2t divides by dim/2 - 1
        if self.dim < smallest or (self.dim % 2 and self.layout_variant != "tensor2tensor"):
            kind = ">= 4" if smallest == 4 else "even and >= 2"
            raise ValueError(f"dim must be {kind} for layout_variant {self.layout_variant!r}, got {self.dim}")
        if not (self.base > 1 and np.isfinite(self.base)):
            raise ValueError(f"base must be a finite number > 1, got {self.base}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions (--seq) must be >= 1, got {self.max_positions}")
        check_size(self.max_positions, stored=4 * self.dim, working=24 * self.dim)  # the (P, dim) table


def table(p: SinusoidalParams) -> np.ndarray:
    """float64 (P, dim) table."""
    half = p.dim // 2
    pos = np.arange(p.max_positions, dtype=np.float64)[:, None]  # (P, 1)
    if p.layout_variant == "tensor2tensor":
        inv_freq = np.exp(-np.arange(half) * (np.log(p.base) / (half - 1)))
    else:
        inv_freq = p.base ** (-np.arange(0, p.dim, 2, dtype=np.float64) / p.dim)
    angles = pos * inv_freq  # (P, dim/2)
    out = np.zeros((p.max_positions, p.dim))
    if p.layout_variant == "interleaved":
        out[:, 0::2], out[:, 1::2] = np.sin(angles), np.cos(angles)
    else:
        out[:, :half], out[:, half : 2 * half] = np.sin(angles), np.cos(angles)  # odd dim: last column stays 0
    return out


ENCODINGS.register("sinusoidal")(
    table_encoding(
        "sinusoidal",
        SinusoidalParams,
        table,
        "transformers 5.23: DistilBERT create_sinusoidal_embeddings (interleaved), XLNet positional_embedding "
        "(concat), M2M100SinusoidalPositionalEmbedding (tensor2tensor)",
    )
)
