"""CAPE, continuous augmented positional embeddings (Likhomanenko et al. 2021, arXiv 2106.03143):
the deterministic inference path, as an absolute encoding.

Must match `CAPE1d` of gcambara/cape@058df08 (cape/cape.py, "following the paper's Python code and the
Flashlight recipe") in eval mode, with its positions `pos_scale * arange(T)` replaced by the graph's
`pos_scale * position_ids`:
    p      = pos_scale * n, minus its mean over the row when `normalize`      (B, S)
    w_i    = freq_scale * exp(2i * (-ln(1e4) / dim)),  i = 0 .. dim/2 - 1
    PE[2i] = sin(p * w_i),  PE[2i + 1] = cos(p * w_i)                         (B, S, dim), interleaved
With pos_scale 1, freq_scale 1 and no normalisation this is the sinusoidal encoding (the paper's
interleaved layout). The training-time augmentations (global shift, local shift, global scaling) are
random and never exported: `pe_export.encodings.training.cape_positions` applies them; their maxima are
parameters here only so that the spec records the recipe the model was trained with.

Numerics. Without `normalize` the embedding is a float64 (P, dim) table read at the positions (one
guarded Gather, rounded once). With it, the centred position depends on the whole row, so the graph
computes in float64: k = S n - sum(n) exactly in int64, angle = k * (pos_scale w / S) with the same
two float64 roundings as the reference, then Sin and Cos, cast once to the export dtype. Positions
are read through a (P,) table first so that positions outside [0, P) fail as everywhere else. The
row mean is over every position of the row (CAPE's padding mask, `x_lengths`, is not part of the
contract: pass only real tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pe_export.dtypes import torch_dtype
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.contracts import contract
from pe_export.encodings.size import check_size
from pe_export.encodings.table_reads import check_positions, guard, take


@dataclass(frozen=True, kw_only=True)
class CapeParams:
    dim: int
    pos_scale: float = 1.0
    freq_scale: float = 1.0
    normalize: bool = False
    max_global_shift: float = 0.0  # training only (pe_export.encodings.training), not in the graph
    max_local_shift: float = 0.0  # training only
    max_global_scaling: float = 1.0  # training only
    max_positions: int = 2048

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 2 or self.dim % 2:
            raise ValueError(f"dim must be even and >= 2, got {self.dim}")
        for name in ("pos_scale", "freq_scale"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("max_global_shift", "max_local_shift"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (self.max_global_scaling >= 1 and math.isfinite(self.max_global_scaling)):
            raise ValueError(f"max_global_scaling must be a finite number >= 1, got {self.max_global_scaling}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions (--seq) must be >= 1, got {self.max_positions}")
        if self.max_positions > 2**26:
            raise ValueError(
                f"max_positions (--seq) must be at most 2^26 (S * n exact in int64 and float64), got "
                f"{self.max_positions}"
            )
        # the (P, dim) table (normalised: a (P,) int64 table, and the probe of every position in one row)
        check_size(self.max_positions, stored=8 if self.normalize else 4 * self.dim, working=24 * self.dim)


def freq(p: CapeParams) -> np.ndarray:
    """(dim/2,) float64 w_i, as CAPE1d: freq_scale * exp(arange(0, dim, 2) * (-ln(1e4) / dim))."""
    return p.freq_scale * np.exp(np.arange(0, p.dim, 2, dtype=np.float64) * (-math.log(1e4) / p.dim))


def interleave(angles: np.ndarray) -> np.ndarray:
    """(..., dim/2) angles -> (..., dim): sin at even dims, cos at odd dims."""
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(*angles.shape[:-1], -1)


def table(p: CapeParams) -> np.ndarray:
    """float64 (P, dim) embeddings of positions 0 .. P-1, without normalisation."""
    return interleave(np.arange(p.max_positions, dtype=np.float64)[:, None] * (p.pos_scale * freq(p)))


def angles(p: CapeParams, ids: np.ndarray) -> np.ndarray:
    """float64 (B, S, dim/2) angles of the inference path, rounded as the graph rounds them."""
    w = p.pos_scale * freq(p)  # (dim/2,)
    if not p.normalize:
        return ids[..., None].astype(np.float64) * w
    S = ids.shape[1]
    k = S * ids - ids.sum(axis=1, keepdims=True)  # (B, S) exact: S * (n - mean(n))
    return k[..., None].astype(np.float64) * (w / float(S))


def cape_reference(spec, inputs: dict) -> np.ndarray:
    p = parse(CapeParams, spec)
    ids = inputs["position_ids"]
    check_positions(ids, p.max_positions)
    return table(p)[ids] if not p.normalize else interleave(angles(p, ids))


def embed_torch(positions, p: CapeParams):
    """Torch form for float positions (B, S) -> (B, S, dim), interleaved sin/cos: what a model trained
    with `pe_export.encodings.training.cape_positions` adds to its input."""
    import torch

    w = torch.from_numpy(freq(p)).to(positions.dtype)  # (dim/2,); pos_scale is already in the positions
    a = positions[..., None] * w  # (B, S, dim/2)
    return torch.stack([torch.sin(a), torch.cos(a)], dim=-1).flatten(-2)


def cape_module(spec):
    import torch

    p = parse(CapeParams, spec)
    P, dtype = p.max_positions, torch_dtype(spec.dtype)

    class Cape(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if p.normalize:
                self.register_buffer("positions", torch.arange(P, dtype=torch.int64))  # (P,): read to fail past P
                self.register_buffer("w", torch.from_numpy(p.pos_scale * freq(p)))  # (dim/2,) float64
            else:
                self.register_buffer("table", torch.from_numpy(table(p)).to(dtype))  # (P, dim)

        def forward(self, position_ids):  # (B, S) -> (B, S, dim)
            ids = guard(position_ids, P)
            if not p.normalize:
                return take(self.table, ids)
            n = take(self.positions, ids)  # (B, S)
            count = torch.ones_like(n).sum(dim=1, keepdim=True)  # (B, 1): S
            k = count * n - n.sum(dim=1, keepdim=True)  # (B, S) exact
            a = k.to(torch.float64)[..., None] * (self.w / count.to(torch.float64)[..., None])  # (B, S, dim/2)
            return torch.stack([torch.sin(a), torch.cos(a)], dim=-1).flatten(-2).to(dtype)

    return Cape().eval()


ENCODINGS.register("cape")(
    Encoding(
        name="cape",
        params=CapeParams,
        module=cape_module,
        reference=cape_reference,
        magnitude=lambda spec, inputs: np.abs(cape_reference(spec, inputs)),  # rounded once (see the docstring)
        reference_impl="gcambara/cape 058df08 CAPE1d (eval mode), re-typed in the tests; sinusoidal (interleaved) "
        "when neutral",
        **contract("absolute", CapeParams),
    )
)
