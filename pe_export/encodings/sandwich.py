"""Sandwich, the parameter-free sinusoidal relative bias (Chi et al. 2023, arXiv 2212.10356).

The logits gain the dot product of two sinusoidal embeddings with the cross terms removed,
`p_i . p_j = sum_f cos((i - j) * inv_freq_f)`, shifted and scaled per head as NeMo does. Must match
NVIDIA/NeMo@000b931 `nemo/collections/nlp/modules/common/megatron/position_embedding/
sandwich_relative_position_embedding.py` (`SandwichRelativePositionEmbedding.forward`):

    inv_freq_f = 1 / 10000^(2 f / D),  f = 1 .. D/2        D = hidden_size (NeMo: per attention head)
    bias[h]    = (sum_f cos(|i - j| * inv_freq_f) - D/2) / ((h + 1) * 8 / H)

Frequency range: f = 1 .. D/2 (NeMo's `arange(1, D/2 + 1)`), not the `arange(1, D/2)` of another
published copy (one frequency fewer). NeMo's is the maintained, versioned implementation and the
paper's sum over D/2 frequencies; with it the bias is exactly 0 at distance 0 (D/2 cosines of 0,
minus D/2), the property the `- D/2` shift exists for, where the other range leaves -1 / scale there.

Causal (`causal`, the default): keys after their query (j > i) hold -inf, as ALiBi's causal mode, so
the bias is also the mask; NeMo `tril`s the distance there (bias 0) and masks in attention, which
gives the same softmax (NeMo `tril`s the sliced (Q, K) matrix by index, which is the mask only when
Q = K; here the mask follows the positions, also with a cache). `--no-causal` is NeMo's `bidirectional`. NeMo calls
`torch.cuda.current_device()` in `forward`; here the bias depends only on |i - j|, so it is a float64
(P, H) table built at export time and read at |i - j| (one rounding per entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.bounds import table_magnitude
from pe_export.encodings.contracts import contract
from pe_export.encodings.kerple import distance_bias_module, distance_bias_np
from pe_export.encodings.size import check_size


@dataclass(frozen=True, kw_only=True)
class SandwichParams:
    heads: int
    hidden_size: int = 64  # D, the sinusoidal dimension (NeMo's hidden_size: per attention head)
    causal: bool = True
    max_positions: int = 2048

    def __post_init__(self):
        if not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"heads must be an integer >= 1, got {self.heads!r}")
        if not isinstance(self.hidden_size, int) or self.hidden_size < 2 or self.hidden_size % 2:
            raise ValueError(f"hidden_size must be an even integer >= 2, got {self.hidden_size!r}")
        if not isinstance(self.max_positions, int) or self.max_positions < 1:
            raise ValueError(f"max_positions (--seq) must be an integer >= 1, got {self.max_positions!r}")
        # the (P, H) table, built from (P, D/2) float64 cosines; verification: (H, 2, P) float64 biases
        check_size(self.max_positions, stored=4 * self.heads, working=16 * self.hidden_size + 88 * self.heads)


def inv_freq(p: SandwichParams) -> np.ndarray:
    """float64 (D/2,): 1 / 10000^(2f / D) for f = 1 .. D/2."""
    f = np.arange(1, p.hidden_size // 2 + 1, dtype=np.float64)
    return 1.0 / 10000.0 ** (2.0 * f / p.hidden_size)


def head_scales(p: SandwichParams) -> np.ndarray:
    """float64 (H,): (h + 1) * 8 / H, the divisor of head h."""
    return np.arange(1, p.heads + 1, dtype=np.float64) * 8.0 / p.heads


def table(p: SandwichParams) -> np.ndarray:
    """float64 (P, H): the bias at each distance d = |i - j| in [0, P)."""
    d = np.arange(p.max_positions, dtype=np.float64)[:, None]  # (P, 1)
    dot = np.cos(d * inv_freq(p)).sum(axis=1, keepdims=True)  # (P, 1): p_i . p_j
    return (dot - p.hidden_size / 2) / head_scales(p)  # (P, H)


def module(spec):
    p = parse(SandwichParams, spec)
    return distance_bias_module(table(p), p.causal, spec.dtype)


def reference(spec, inputs):
    p = parse(SandwichParams, spec)
    return distance_bias_np(table(p), p.causal, inputs["query_positions"], inputs["key_positions"], spec.dtype)


ENCODINGS.register("sandwich")(
    Encoding(
        name="sandwich",
        params=SandwichParams,
        module=module,
        reference=reference,
        magnitude=table_magnitude(reference),
        **contract("bias", SandwichParams),
        reference_impl="NVIDIA/NeMo@000b931 SandwichRelativePositionEmbedding (transcribed)",
    )
)
