"""KERPLE, kernelized relative positional embedding (Chi et al. 2022, arXiv 2205.09921).

Must match chijames/KERPLE@73f1ee2 `megatron/mpu/layers.py`, `ParallelKerpleLog` and
`ParallelKerplePower` (the bias kernel, `bias_ap`; the optional multiplicative weight kernel is not a
bias and is not exported). Per head h, with learned p_h and a_h, at distance d = i - j >= 0:

    log     -p_h * log(1 + a_h * d)
    power   -a_h * d^p_h                  0 < p_h <= 2 (a conditionally positive definite kernel)

p and a are per-head lists (`--p 1.2 --p 0.7 ...`, one per head); without them they are drawn as the
reference initialises them, `p = 2 * U(0, 1)`, `a = U(0, 1)`, from `init_seed`. As the reference's
`forward` does, p and a are clamped to >= 1e-2 (and the power variant's p to <= 2) before use.

Causal (`causal`, the default): every entry whose key comes after its query (j > i) holds -inf, as
ALiBi's causal mode, so the bias is also the causal mask. The reference computes the kernel on
`tril(i - j)`, which puts 0 there, and masks in attention; after softmax the two are the same.
`--no-causal` gives the symmetric kernel at |i - j|. The bias depends only on the distance, so the
graph reads a float64-built (P, H) table at |i - j|: one rounding per entry. A value below the export
dtype's lowest finite number (the power kernel in fp16: -a * 2047^2 is far below -65504) is stored as
that number rather than -inf, so that -inf stays the causal mask alone; softmax weighs both as 0.
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

VARIANTS = ("log", "power")
CLAMP_MIN = 1e-2  # the reference's eps: p and a are clamped to >= eps in every forward


@dataclass(frozen=True, kw_only=True)
class KerpleParams:
    heads: int
    variant: str = "log"
    p: list[float] | None = None  # per head; None: drawn as the reference initialises it
    a: list[float] | None = None  # per head; None: drawn as the reference initialises it
    init_seed: int = 0  # seed of the reference initialisation, used for p or a not given
    causal: bool = True
    max_positions: int = 2048

    def __post_init__(self):
        if not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"heads must be an integer >= 1, got {self.heads!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise ValueError(f"init_seed must be an integer >= 0, got {self.init_seed!r}")
        p_range = "0 < p <= 2" if self.variant == "power" else "p > 0"
        for name, valid, ok in (
            ("p", p_range, lambda v: v > 0 and (self.variant != "power" or v <= 2)),
            ("a", "a > 0", lambda v: v > 0),
        ):
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, (list, tuple)) or len(values) != self.heads:
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)
                raise ValueError(f"{name} must list one value per head ({self.heads}), got {got}")
            bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v))]
            if bad:
                raise ValueError(f"{name} of the {self.variant} kernel must be finite with {valid}, got {bad[0]!r}")
        if not isinstance(self.max_positions, int) or self.max_positions < 1:
            raise ValueError(f"max_positions (--seq) must be an integer >= 1, got {self.max_positions!r}")
        # the (P, H) table; verification reads every distance: (H, 2, P) float64 biases, a few at once
        check_size(self.max_positions, stored=4 * self.heads, working=88 * self.heads)


def kernel_params(p: KerpleParams) -> tuple[np.ndarray, np.ndarray]:
    """float64 (H,) p and a as the reference uses them: given, or its initialisation, then clamped."""
    rng = np.random.default_rng(p.init_seed)
    drawn_p, drawn_a = 2.0 * rng.random(p.heads), rng.random(p.heads)  # bias_p, then bias_a
    kp = np.asarray(p.p, dtype=np.float64) if p.p is not None else drawn_p
    ka = np.asarray(p.a, dtype=np.float64) if p.a is not None else drawn_a
    kp = np.clip(kp, CLAMP_MIN, 2.0 if p.variant == "power" else None)
    return kp, np.maximum(ka, CLAMP_MIN)


def table(p: KerpleParams) -> np.ndarray:
    """float64 (P, H): the bias at each distance d = |i - j| in [0, P)."""
    kp, ka = kernel_params(p)
    d = np.arange(p.max_positions, dtype=np.float64)[:, None]  # (P, 1)
    if p.variant == "log":
        return -kp * np.log1p(ka * d)
    return -ka * d**kp


# ------------------------------------------------------------------------------------------------
# A bias that is a function of the distance |i - j| only (KERPLE, Sandwich): a float64 (P, H) table


def saturate(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values below the dtype's lowest finite number -> that number (not -inf: -inf is the mask)."""
    import ml_dtypes

    from pe_export.dtypes import numpy_dtype

    lowest = float(ml_dtypes.finfo(numpy_dtype(dtype)).min)
    return np.maximum(values, lowest)


def distance_bias_np(table_pH: np.ndarray, causal: bool, q: np.ndarray, k: np.ndarray, dtype: str) -> np.ndarray:
    """float64 (1, H, Q, K): table[|i - j|], -inf where j > i when causal."""
    P = table_pH.shape[0]
    check_positions(q, P, "query position")
    check_positions(k, P, "key position")
    d = q[:, None] - k[None, :]  # (Q, K)
    bias = saturate(table_pH, dtype)[np.abs(d)].transpose(2, 0, 1)  # (H, Q, K)
    if causal:
        bias = np.where(d < 0, -np.inf, bias)
    return bias[None]


def distance_bias_module(table_pH: np.ndarray, causal: bool, dtype: str):
    """The torch original: a guarded read of the (P, H) table at |i - j|, cast once to `dtype`."""
    import torch

    from pe_export.dtypes import torch_dtype

    P = table_pH.shape[0]

    class DistanceBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.from_numpy(saturate(table_pH, dtype)).to(torch_dtype(dtype)))  # (P, H)

        def forward(self, query_positions, key_positions):  # (Q,), (K,) -> (1, H, Q, K)
            q, k = guard(query_positions, P), guard(key_positions, P)  # out of range -> P
            bad = (q[:, None] == P) | (k[None, :] == P)
            d = q[:, None] - k[None, :]  # (Q, K)
            bias = take(self.table, torch.where(bad, P, d.abs())).permute(2, 0, 1)  # (H, Q, K); bad -> past the table
            if causal:  # in float32 (exact both ways): ORT CPU has no bfloat16 Add
                bias = mask_later_keys(bias.float(), d < 0).to(self.table.dtype)
            return bias[None]

    return DistanceBias().eval()


# ------------------------------------------------------------------------------------------------


def module(spec):
    p = parse(KerpleParams, spec)
    return distance_bias_module(table(p), p.causal, spec.dtype)


def reference(spec, inputs):
    p = parse(KerpleParams, spec)
    return distance_bias_np(table(p), p.causal, inputs["query_positions"], inputs["key_positions"], spec.dtype)


def derived(spec) -> dict:
    kp, ka = kernel_params(parse(KerpleParams, spec))
    return {"p": kp.tolist(), "a": ka.tolist()}


ENCODINGS.register("kerple")(
    Encoding(
        name="kerple",
        params=KerpleParams,
        module=module,
        reference=reference,
        magnitude=table_magnitude(reference),
        derived=derived,
        **contract("bias", KerpleParams),
        reference_impl="chijames/KERPLE@73f1ee2 megatron/mpu/layers.py ParallelKerpleLog, ParallelKerplePower "
        "(transcribed)",
    )
)
