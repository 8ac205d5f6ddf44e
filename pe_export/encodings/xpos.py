"""xPos, extrapolatable position embedding (Sun et al. 2023, "A Length-Extrapolatable Transformer",
arXiv 2212.10554): interleaved RoPE whose output is multiplied by a per-pair decay.

Must match torchscale's `XPOS` (microsoft/torchscale@776b070, torchscale/component/xpos_relative_position.py),
as its `MultiheadAttention` calls it: `q = xpos(q, offset, downscale=False)`, `k = xpos(k, 0, downscale=True)`.
NeMo's `XPOSPositionEmbedding` is the same with `scale_base` 2048 (torchscale: 512).

For a pair (a, b) = (x[2i], x[2i + 1]) at position n, in a call whose largest position is L - 1:
    zeta_i = (2i + 0.4 D) / (1.4 D)                       torchscale's `scale` buffer, i = 0 .. D/2 - 1
    c      = ceil(L / 2)                                  torchscale's centring: min_pos = -(L // 2 rounded up)
    F      = zeta_i ^ ((n - c) / scale_base)              role "query";  zeta_i ^ (-(n - c) / scale_base) for "key"
    a'     = F (a cos - b sin),   b' = F (b cos + a sin), angle n * 10000^(-2i/D)
so q_m . k_n carries zeta_i^((m - n) / scale_base) whatever the centre, as long as query and key are
rotated in calls with the same L (torchscale: the key length; a decode step's query sits at L - 1).

Contract: the rotary one of rope.py, layout bhsd only: x (B, H, S, D), position_ids int64 (B, S) ->
y (B, H, S, D); the role is fixed at export (`role`), so a model exports one graph for q and one for k.
L is max(position_ids) + 1 over the whole call (torchscale's length + offset when positions are
0 .. L - 1, one L for the batch as in torchscale). Positions outside [0, max_positions) fail.

Numerics. cos, sin and F come from float64 tables (F indexed by n - c, which lies in
[-ceil(P/2), P - 1 - ceil(P/2)]) rounded once to float32; the graph computes in float32 and casts y once
to the export dtype, so fp16 and bf16 outputs are rounded once. F grows as (1 / zeta_0)^(P / (2 scale_base))
= 3.5^(P / (2 scale_base)): the export refuses a table whose largest F (or 1/F) exceeds the square root of
the export dtype's largest finite value (fp16: 256, reached near P = 4532 with scale_base 512; float32, the
compute dtype of every export, 1.8e19, near P = 36000), so that F * x stays finite for |x| up to that
root instead of turning into inf silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.probes import position_cases
from pe_export.encodings.rope import apply_reference, apply_torch, rope_locate
from pe_export.encodings.size import check_size
from pe_export.encodings.table_reads import check_positions, guard, take

ROLES = ("query", "key")
THETA = 10000.0  # torchscale's fixed_pos_embedding


@dataclass(frozen=True, kw_only=True)
class XposParams:
    head_dim: int
    scale_base: float = 512.0
    role: str = "query"
    max_positions: int = 2048

    def __post_init__(self):
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2, got {self.head_dim}")
        if not (self.scale_base > 0 and math.isfinite(self.scale_base)):
            raise ValueError(f"scale_base must be a finite number > 0, got {self.scale_base}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions (--seq) must be >= 1, got {self.max_positions}")
        if self.max_positions > 2**24:
            raise ValueError(f"max_positions (--seq) must be at most 2^24, got {self.max_positions}")
        check_size(
            self.max_positions, stored=6 * self.head_dim, working=36 * self.head_dim
        )  # cos, sin, F: (P, D/2) each
        check_range(self, "fp32")  # the graph computes in float32 whatever the export dtype


def zeta(p: XposParams) -> np.ndarray:
    """(D/2,) float64 per-pair decay base, torchscale's `(arange(0, D, 2) + 0.4 D) / (1.4 D)`."""
    return (np.arange(0, p.head_dim, 2, dtype=np.float64) + 0.4 * p.head_dim) / (1.4 * p.head_dim)


def offset(p: XposParams) -> int:
    """Row of the scale table for n - c = 0: the table covers n - c in [-ceil(P/2), P - 1 - ceil(P/2)]."""
    return (p.max_positions + 1) // 2


def centre(max_position: int) -> int:
    """c = ceil(L / 2) for L = max_position + 1: torchscale's -min_pos, min_pos = -L // 2 (floor)."""
    return (max_position + 2) // 2


def tables(p: XposParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 cos and sin (P, D/2) at positions 0 .. P-1, and the scale F (P, D/2) at n - c = row - offset."""
    inv_freq = THETA ** (-np.arange(0, p.head_dim, 2, dtype=np.float64) / p.head_dim)
    angles = np.arange(p.max_positions, dtype=np.float64)[:, None] * inv_freq  # (P, D/2)
    sign = 1.0 if p.role == "query" else -1.0  # keys are divided by the scale (torchscale's downscale)
    e = np.arange(p.max_positions, dtype=np.float64)[:, None] - offset(p)  # (P, 1): n - c
    return np.cos(angles), np.sin(angles), zeta(p) ** (sign * e / p.scale_base)


def log10_largest_scale(p) -> float:
    """log10 of the largest F or 1/F over the table: pair 0 (the smallest zeta) at |n - c| = ceil(P/2)."""
    return -offset(p) / p.scale_base * math.log10(0.4 / 1.4)


def largest_scale(p) -> float:
    return 10 ** min(log10_largest_scale(p), 308.0)


def check_range(p, dtype: str) -> None:
    """Refuse tables whose largest F exceeds sqrt(dtype max): fp16 256, float32 (the compute dtype of
    every export, so checked with the parameters) 1.8e19."""
    limit = math.sqrt(float(np.finfo(np.float16 if dtype == "fp16" else np.float32).max))
    if log10_largest_scale(p) > math.log10(limit):
        raise ValueError(
            f"xpos scale factors reach 10^{log10_largest_scale(p):.1f} at {p.max_positions} positions with scale_base "
            f"{p.scale_base}, above {limit:.4g} (the square root of {dtype}'s largest value), where scaled outputs "
            f"overflow; use a shorter --seq or a larger --scale-base" + (" or fp32" if dtype == "fp16" else "")
        )


def xpos_reference(spec, inputs: dict) -> np.ndarray:
    """float64 truth: RoPE (interleaved, theta 10000) times F, with c from the call's largest position."""
    p = parse(XposParams, spec)
    ids = inputs["position_ids"]
    check_positions(ids, p.max_positions)
    cos, sin, scale = tables(p)
    rows = ids - centre(int(ids.max())) + offset(p)  # (B, S)
    c, s = cos[ids] * scale[rows], sin[ids] * scale[rows]  # (B, S, D/2): per-element tables
    B, S = ids.shape
    flat = np.arange(B * S).reshape(B, S)
    x = np.asarray(inputs["x"]).astype(np.float64)
    return apply_reference(
        x, c.reshape(B * S, -1), s.reshape(B * S, -1), flat, pairing="interleaved", rotary_dim=p.head_dim, layout="bhsd"
    )


def xpos_module(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(XposParams, spec)
    check_range(p, spec.dtype)
    P, half = p.max_positions, offset(p)
    cos, sin, scale = tables(p)

    class Xpos(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # float64 -> float32, rounded once; the arithmetic runs in float32 and y is cast once.
            for name, t in (("cos_table", cos), ("sin_table", sin), ("scale_table", scale)):
                self.register_buffer(name, torch.from_numpy(t).to(torch.float32))  # (P, D/2)

        def forward(self, x, position_ids):  # x (B, H, S, D), position_ids (B, S) -> (B, H, S, D)
            # ceil(L / 2), L = max + 1: torchscale's centre. Truncating division: the same as // for the
            # max >= -2 of any valid input (all-negative ids are guarded to row P below and fail), and
            # exported as one integer Div, where // brings a sign fix-up whose Equal of two bools tract rejects.
            c = torch.div(position_ids.max() + 2, 2, rounding_mode="trunc")
            ids = guard(position_ids, P)  # out of range -> row P: the Gathers fail
            rows = torch.where(ids == P, P, ids - c + half)  # (B, S) rows of the scale table
            f = take(self.scale_table, rows)  # (B, S, D/2)
            cos_f = (take(self.cos_table, ids) * f)[:, None]  # (B, 1, S, D/2)
            sin_f = (take(self.sin_table, ids) * f)[:, None]
            y = apply_torch(x.to(torch.float32), cos_f, sin_f, interleaved=True, rotary_dim=p.head_dim)
            return y.to(torch_dtype(spec.dtype))

    return Xpos().eval()


def xpos_example_inputs(spec):
    import torch

    from pe_export.dtypes import torch_dtype
    from pe_export.encodings.probes import dims

    p = parse(XposParams, spec)
    S = min(5, p.max_positions)
    x = torch.zeros((2, 3, S, p.head_dim), dtype=torch_dtype(spec.dtype))
    ids = torch.zeros((2, S), dtype=torch.int64)
    return (
        (x, ids),
        {"x": dims("batch", "heads", "seq"), "position_ids": dims("batch", "seq")},
        ["x", "position_ids"],
        ["y"],
    )


def xpos_probes(spec, rng: np.random.Generator, batch: int = 2) -> list[tuple[str, dict]]:
    """common.position_cases (spread ending in the last row, the last block, a decode step, every row
    once) with three heads of standard normal x; plus a short prefill from 0 (a small centre)."""
    from pe_export.dtypes import numpy_dtype

    p = parse(XposParams, spec)
    cases = position_cases(p.max_positions, rng, batch)
    cases.insert(
        3, ("start", np.broadcast_to(np.arange(min(p.max_positions, 16)), (batch, min(p.max_positions, 16))).copy())
    )
    out = []
    for name, ids in cases:
        heads = 1 if name == "all" else 3
        x = rng.standard_normal((ids.shape[0], heads, ids.shape[1], p.head_dim), dtype=np.float32)
        out.append((name, {"x": x.astype(numpy_dtype(spec.dtype)), "position_ids": ids}))
    return out


def xpos_magnitude(spec, inputs: dict) -> np.ndarray:
    """The rounding-error bound of each output element divided by 2 eps(dtype): verify's bound is
    2 * eps * magnitude (+ denormals), so the bound it checks is exactly the one derived here.

    What the graph computes (xpos_module): cos, sin and F are float64 tables rounded once to float32;
    x is cast to float32 (exact from fp16 and bf16); in float32, cos_f = cos * F and sin_f = sin * F
    (Mul), then y_a = a * cos_f - b * sin_f and y_b = b * cos_f + a * sin_f (two Muls and a Sub or
    Add); then one Cast to the export dtype (none in fp32). With u = eps32 / 2 and each rounding off by
    at most u relative, to first order: cos_f carries cos's, F's and the product's rounding (3u), the
    product with a one more (4u), the sum one more (5u), likewise for b * sin_f (an FMA only drops one):
        E32 = 5u F (|a cos| + |b sin|) for y_a,   5u F (|b cos| + |a sin|) for y_b.
    The final cast to fp16/bf16 rounds y32 = y + e (|e| <= E32) to nearest: its error is at most
    u_d |y32| <= u_d |y| + u_d E32, so the total is u_d |y| + (1 + u_d) E32 (u_d = eps(dtype) / 2;
    results in the subnormal range are covered by verify's denorm_min term). That last rounding is
    attained almost exactly (measured: 0.99 of u_d |y|), so it is counted twice, the margin verify
    gives a table read, and a correct fp16/bf16 file sits near 0.5 of its bound. The torch module computes
    the same way (x.to(float32), one cast of y), so the bound covers it too."""
    from pe_export.dtypes import EPS

    p = parse(XposParams, spec)
    ids = inputs["position_ids"]
    cos, sin, scale = tables(p)
    f = scale[ids - centre(int(ids.max())) + offset(p)]  # (B, S, D/2), F > 0
    c, s = (np.abs(cos[ids]) * f)[:, None], (np.abs(sin[ids]) * f)[:, None]  # (B, 1, S, D/2)
    x = np.abs(np.asarray(inputs["x"]).astype(np.float64))
    a, b = x[..., 0::2], x[..., 1::2]  # (B, H, S, D/2)
    e32 = 5 * EPS["fp32"] / 2 * np.stack([a * c + b * s, b * c + a * s], axis=-1).reshape(x.shape)  # (B, H, S, D)
    if spec.dtype == "fp32":
        error = e32
    else:
        u = EPS[spec.dtype] / 2
        error = 2 * u * np.abs(xpos_reference(spec, inputs)) + (1 + u) * e32  # the cast: twice its worst case (below)
    return error / (2 * EPS[spec.dtype])


ENCODINGS.register("xpos")(
    Encoding(
        name="xpos",
        params=XposParams,
        module=xpos_module,
        example_inputs=xpos_example_inputs,
        probes=xpos_probes,
        reference=xpos_reference,
        magnitude=xpos_magnitude,
        locate=rope_locate,
        derived=lambda spec: {"largest_scale": largest_scale(parse(XposParams, spec))},
        kind="rotary",
        ops=("decomposed",),
        layouts=("bhsd",),
        reference_impl="torchscale 776b070 XPOS (xpos_relative_position.py), re-typed in the tests",
    )
)
