"""The RoPE rotation on cos/sin rows already gathered: float64 NumPy reference and torch form.

Pairs (a, b) rotate as a' = a * cos - b * sin, b' = b * cos + a * sin. `half` pairs (i, i + R/2), as
transformers 5.23 `rotate_half` (Llama-HF, GPT-NeoX); `interleaved` pairs (2i, 2i + 1), as
`modeling_gptj.rotate_every_two` (GPT-J, Meta's reference). Partial rotary rotates `x[..., :R]` and
passes the tail through. A leaf: the custom op, the modules and the encoding all call it.
"""

from __future__ import annotations

import numpy as np

from pe_export.spec import LAYOUTS


def heads_axis(layout: str) -> int:
    return LAYOUTS.index(layout) + 1  # bhsd: 1, bshd: 2


def apply_reference(
    x: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    position_ids: np.ndarray,
    *,
    pairing: str,
    rotary_dim: int,
    layout: str,
) -> np.ndarray:
    """float64 NumPy RoPE. x: (B, H, S, D) or (B, S, H, D); tables (P, R/2); position_ids (B, S)."""
    if position_ids.min() < 0 or position_ids.max() >= cos.shape[0]:
        raise IndexError(f"position out of range [0, {cos.shape[0]})")
    x = np.asarray(x, dtype=np.float64)
    c = np.expand_dims(cos[position_ids], heads_axis(layout))  # (B, 1, S, R/2) or (B, S, 1, R/2)
    s = np.expand_dims(sin[position_ids], heads_axis(layout))
    rot = x[..., :rotary_dim]
    if pairing == "half":
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
        out = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.stack([a * c - b * s, b * c + a * s], axis=-1).reshape(rot.shape)
    return np.concatenate([out, x[..., rotary_dim:]], axis=-1)


def apply_torch(x, cos, sin, *, interleaved: bool, rotary_dim: int):
    """The torch form of `apply_reference`, on cos/sin already gathered and broadcastable to x[..., :R/2]."""
    import torch

    rot, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([out, tail], dim=-1)
