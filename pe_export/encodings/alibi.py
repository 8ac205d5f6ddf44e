"""ALiBi, attention with linear biases (Press et al. 2022, arXiv 2108.12409).

Slopes for any head count: MPT's rule `1 / 2^((1..p2) * alibi_bias_max / p2)`, p2 = the next power of
two, interleaved as `slopes[1::2] + slopes[::2]` when H is not one. With `alibi_bias_max` 8 it is Press's
`get_slopes` (ofirpress/attention_with_linear_biases fairseq/models/transformer.py), including the
non-power-of-two rule, and BLOOM's `_get_alibi_slopes`. Must match transformers 5.23 `build_alibi_tensor`
(BLOOM) and `build_mpt_alibi_tensor` (MPT).

Bias for query position i and key position j (`convention`):
  relative   -slope_h * (i - j)            the paper's form; bidirectional: -slope_h * |i - j|
  bloom      slope_h * j                   BLOOM: the key's position (its cumsum of the mask, minus 1)
  mpt        slope_h * (j - max_j)         MPT: relative to the last key, `arange(1 - K, 1)`
The three differ by a constant per row, which softmax ignores. In the causal form (`causal`) every
entry whose key comes after its query (j > i) holds -inf, so the bias is also the causal mask.
The bias is computed in float32 (as BLOOM and MPT do) and cast once to the export dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.bounds import table_magnitude
from pe_export.encodings.contracts import contract
from pe_export.encodings.size import check_size
from pe_export.encodings.table_reads import check_positions, guard, mask_later_keys, take

CONVENTIONS = ("relative", "bloom", "mpt")


@dataclass(frozen=True, kw_only=True)
class AlibiParams:
    heads: int
    causal: bool = True
    convention: str = "relative"
    alibi_bias_max: float = 8.0
    max_positions: int = 2048

    def __post_init__(self):
        if not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"heads must be an integer >= 1, got {self.heads!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {self.convention!r}")
        if not self.causal and self.convention != "relative":
            raise ValueError(
                f"the {self.convention} convention is causal; the bidirectional form is convention 'relative'"
            )
        if not (self.alibi_bias_max > 0 and math.isfinite(self.alibi_bias_max)):
            raise ValueError(f"alibi_bias_max must be a finite number > 0, got {self.alibi_bias_max}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions (--seq) must be >= 1, got {self.max_positions}")
        if self.max_positions > 2**24:
            raise ValueError(f"max_positions (--seq) must be at most 2^24 (exact in float32), got {self.max_positions}")
        # a (P,) float32 table; verification reads every distance: (H, 2, P) float64 biases, a few at once
        check_size(self.max_positions, stored=4, working=64 * self.heads)


def slopes(heads: int, alibi_bias_max: float = 8.0) -> np.ndarray:
    """float64 (H,) slopes."""
    p2 = 2 ** math.ceil(math.log2(heads))
    s = 1.0 / 2.0 ** (np.arange(1, p2 + 1) * (alibi_bias_max / p2))
    return s if p2 == heads else np.concatenate([s[1::2], s[::2]])[:heads]


def bias_np(p: AlibiParams, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """float64 (1, H, Q, K) bias for query positions q (Q,) and key positions k (K,)."""
    i, j = q[:, None].astype(np.float64), k[None, :].astype(np.float64)  # (Q, 1), (1, K)
    dist = {"relative": j - i if p.causal else -np.abs(i - j), "bloom": j + 0 * i, "mpt": j - k.max() + 0 * i}[
        p.convention
    ]
    bias = slopes(p.heads, p.alibi_bias_max)[:, None, None] * dist  # (H, Q, K)
    if p.causal:
        bias = np.where(j > i, -np.inf, bias)
    return bias[None]


def module(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(AlibiParams, spec)
    P = p.max_positions

    class Alibi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # (1, H, 1, 1), so that the bias is (1, H, Q, K) at once: onnx2tf wrote the Unsqueeze of an
            # (H, Q, K) bias as a RESHAPE to a fixed (1, H, 1, 1), which LiteRT cannot run (docs/runtimes.md: LiteRT).
            self.register_buffer(
                "slopes", torch.from_numpy(slopes(p.heads, p.alibi_bias_max)).float()[None, :, None, None]
            )
            # Positions as float32, read through a table so that positions outside [0, P) fail.
            self.register_buffer("positions", torch.arange(P, dtype=torch.float32))  # (P,)

        def forward(self, query_positions, key_positions):  # (Q,), (K,) -> (1, H, Q, K)
            i = take(self.positions, guard(query_positions, P))[:, None]  # (Q, 1)
            j = take(self.positions, guard(key_positions, P))[None, :]  # (1, K)
            if p.convention == "relative":
                dist = j - i if p.causal else -(i - j).abs()
            else:
                dist = (j - j.max() if p.convention == "mpt" else j) + 0 * i  # (Q, K)
            bias = self.slopes * dist  # (1, H, Q, K)
            if p.causal:
                bias = mask_later_keys(bias, j > i)
            return bias.to(torch_dtype(spec.dtype))

    return Alibi().eval()


def reference(spec, inputs):
    p = parse(AlibiParams, spec)
    q, k = inputs["query_positions"], inputs["key_positions"]
    check_positions(q, p.max_positions, "query position")
    check_positions(k, p.max_positions, "key position")
    return bias_np(p, q, k)


def derived(spec) -> dict:
    p = parse(AlibiParams, spec)
    return {"slopes": slopes(p.heads, p.alibi_bias_max).tolist()}


ENCODINGS.register("alibi")(
    Encoding(
        name="alibi",
        params=AlibiParams,
        module=module,
        reference=reference,
        magnitude=table_magnitude(reference),  # the float32 slope, the product and the cast each round once
        derived=derived,
        **contract("bias", AlibiParams),
        reference_impl="transformers 5.23 bloom build_alibi_tensor, mpt build_mpt_alibi_tensor; Press get_slopes",
    )
)
