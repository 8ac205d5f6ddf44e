"""FIRE, functional interpolation for relative positions (Li et al. 2023, arXiv 2310.04418).

    bias[h](i, j) = MLP_h( psi(c * (i - j)) / psi(c * max(i, L)) ),   psi(x) = log(x + 1),   j <= i

Progressive interpolation: the input is the log distance normalised by the log of the query position,
or of the threshold L while the query is shorter than L, so it lies in [0, 1) at any length. The MLP is
the paper's: Linear(1, mlp_width) -> ReLU -> Linear(mlp_width, H), one output per head. Learned: the MLP,
c (init 0.1) and L = |L_multiplier * init_L| (L_multiplier learned, init 1; init_L fixed, 512).
No official code was published; this matches the public reproduction credited to
mcleish7/arithmetic `cramming/architectures/embeddings.py` (class FIRE), including its
`|c * x|` and the `+ eps` (1e-6) on the normaliser, and its state-dict names.

Causal: keys after their query (j > i) hold -inf (the reproduction leaves masking to the caller, and
its input would leave [0, 1] there). Weights are seeded random (`weights_seed`; c and L_multiplier at
their initial values), or read from a `.safetensors` file or a torch state dict: `--key PREFIX` names
the module, whose tensors are `PREFIX.mlp.0.weight` (W, 1), `mlp.0.bias` (W,), `mlp.2.weight` (H, W),
`mlp.2.bias` (H,), `c` and `L_multiplier` (scalars), and optionally `init_L` (must equal `init_L`).

The two psi tables (distance, and query position) are built in float64 and rounded once; the graph
divides them and runs the MLP in float32 whatever the export dtype (as the reference computes in
float32), then casts once. Its cost is O(Q * K * mlp_width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pe_export import weights
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.contracts import contract
from pe_export.encodings.size import check_size
from pe_export.encodings.table_reads import check_positions, guard, mask_later_keys, take

SCALARS = ("c", "L_multiplier")


@dataclass(frozen=True, kw_only=True)
class FireParams(weights.LearnedWeights):
    heads: int
    mlp_width: int = 32
    init_c: float = 0.1  # c of the seeded random weights (a weights file carries its own)
    init_L: float = 512.0  # the fixed part of the threshold L = |L_multiplier * init_L|
    eps: float = 1e-6  # added to the normaliser, as the reproduction does
    max_positions: int = 2048

    def __post_init__(self):
        self.check_weights()
        for name in ("heads", "mlp_width", "max_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        # two (P,) float32 tables; verification reads every distance: the MLP's (2, P, W) float64 hidden
        # units (and their bound's), and (H, 2, P) float64 biases
        check_size(self.max_positions, stored=8, working=64 * self.mlp_width + 64 * self.heads)
        for name in ("init_c", "init_L", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def learned(p: FireParams) -> dict[str, np.ndarray]:
    """float64 w1 (W,), b1 (W,), w2 (H, W), b2 (H,), c and L_multiplier (scalars)."""
    W, H = p.mlp_width, p.heads
    if p.weights is None:
        # N(0, 1 / fan_in): the scale of torch's Linear initialisation, drawn reproducibly.
        t = weights.random(
            p.weights_seed, {"w1": (W,), "b1": (W,), "w2": (H, W), "b2": (H,)}, {"w2": W**-0.5, "b2": W**-0.5}
        )
        return t | {"c": np.float64(p.init_c), "L_multiplier": np.float64(1.0)}
    found = weights.load_group(p)
    where = f"under {p.key!r} of {p.weights!r}"
    shapes = {
        "mlp.0.weight": (W, 1),
        "mlp.0.bias": (W,),
        "mlp.2.weight": (H, W),
        "mlp.2.bias": (H,),
        "c": (),
        "L_multiplier": (),
    }
    extra = sorted(set(found) - set(shapes) - {"init_L"})
    missing = sorted(set(shapes) - set(found))
    if missing or extra:
        problem = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"
        raise ValueError(f"FIRE weights {where}: {problem}; want exactly {', '.join(shapes)} (and optionally init_L)")
    for name, shape in shapes.items():
        got = found[name].reshape(()) if shape == () and found[name].size == 1 else found[name]
        if got.shape != shape:
            raise ValueError(
                f"tensor {name!r} {where} has shape {tuple(got.shape)}, want {shape} (heads {H}, mlp_width {W})"
            )
    if "init_L" in found and float(found["init_L"].reshape(-1)[0]) != p.init_L:
        raise ValueError(
            f"tensor 'init_L' {where} is {float(found['init_L'].reshape(-1)[0])}, but init_L is {p.init_L}; pass "
            f"--init-L"
        )
    return {
        "w1": found["mlp.0.weight"][:, 0],
        "b1": found["mlp.0.bias"],
        "w2": found["mlp.2.weight"],
        "b2": found["mlp.2.bias"],
        "c": found["c"].reshape(()),
        "L_multiplier": found["L_multiplier"].reshape(()),
    }


def psi_tables(p: FireParams, t: dict) -> tuple[np.ndarray, np.ndarray]:
    """float64 (P,) psi(|c| d) for each distance d, and (P,) psi(|c| max(i, L)) + eps for each query i."""
    c, L = abs(float(t["c"])), abs(float(t["L_multiplier"]) * p.init_L)
    n = np.arange(p.max_positions, dtype=np.float64)
    return np.log1p(c * n), np.log1p(c * np.maximum(n, L)) + p.eps


def inputs_np(p: FireParams, t: dict, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """float64 (Q, K): the MLP's input psi(c |i - j|) / psi(c max(i, L)) (in [0, 1) where j <= i)."""
    num, den = psi_tables(p, t)
    return num[np.abs(q[:, None] - k[None, :])] / den[q][:, None]


def forward_np(spec, inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """float64 MLP input x (Q, K, 1), hidden units h (Q, K, W), output (Q, K, H) before masking, and
    the learned tensors."""
    p = parse(FireParams, spec)
    q, k = inputs["query_positions"], inputs["key_positions"]
    check_positions(q, p.max_positions, "query position")
    check_positions(k, p.max_positions, "key position")
    t = learned(p)
    x = inputs_np(p, t, q, k)[..., None]  # (Q, K, 1)
    h = np.maximum(x * t["w1"] + t["b1"], 0.0)  # (Q, K, W)
    return x, h, h @ t["w2"].T + t["b2"], t  # (Q, K, H)


def causal(inputs, values: np.ndarray, fill: float) -> np.ndarray:
    """(Q, K, H) -> (1, H, Q, K), `fill` where the key is after the query."""
    d = (inputs["query_positions"][:, None] - inputs["key_positions"][None, :])[None]  # (1, Q, K)
    return np.where(d < 0, fill, values.transpose(2, 0, 1))[None]


def reference(spec, inputs):
    """float64 (1, H, Q, K) bias, -inf for keys after their query."""
    return causal(inputs, forward_np(spec, inputs)[2], -np.inf)


def magnitude(spec, inputs):
    """(1, H, Q, K) rounding-error bound of each bias divided by 2 eps(dtype): verify's bound is
    2 * eps * magnitude (+ denormals), so the bound it checks is exactly the one derived here.

    What the graph computes (module below): the tables num, den, w1, b1, w2, b2 are float64 rounded
    once to float32; in float32, x = num[|i - j|] / den[i] (Div), pre = x * w1 + b1 (Mul, Add),
    h = relu(pre), out = h @ w2 (MatMul over W) + b2 (Add); then one Cast to the export dtype (none in
    fp32). With u = eps32 / 2 and each rounding off by at most u relative, to first order:
      x        num, den and the division: 3u |x|
      pre      x's 3u, w1's rounding, the product and the sum: 6u |x w1|; b1's rounding and the sum: 2u |b1|
      h        relu is 1-Lipschitz: no more than pre's error
      out      h's error times |w2|; w2's rounding, the product and the W - 1 additions of a length-W
               dot product in any order: (W + 1)u |w2 h|; the bias add: u on the dot, 2u on |b2|. So
      E32 = u * (sum_w |w2| (6 |x w1| + 2 |b1| + (W + 2) h) + 2 |b2|).
    The final cast to fp16/bf16 rounds y32 = out + e (|e| <= E32) to nearest: its error is at most
    u_d |y32| <= u_d |out| + u_d E32, so the total is u_d |out| + (1 + u_d) E32 (u_d = eps(dtype) / 2;
    results in the subnormal range are covered by verify's denorm_min term). That last rounding is
    attained almost exactly (measured: 0.99 of u_d |y|), so it is counted twice, the margin verify
    gives a table read, and a correct fp16/bf16 file sits near 0.5 of its bound. float64 errors of the
    tables and the reference are 2^-29 of these and left out."""
    from pe_export.dtypes import EPS

    x, h, out, t = forward_np(spec, inputs)
    inner = 6 * np.abs(x * t["w1"]) + 2 * np.abs(t["b1"]) + (len(t["b1"]) + 2) * h  # (Q, K, W)
    error = EPS["fp32"] / 2 * (inner @ np.abs(t["w2"]).T + 2 * np.abs(t["b2"]))  # (Q, K, H): E32
    if spec.dtype != "fp32":
        u = EPS[spec.dtype] / 2
        error = 2 * u * np.abs(out) + (1 + u) * error  # the cast: twice its worst case (below)
    return causal(inputs, error / (2 * EPS[spec.dtype]), 0.0)


def module(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(FireParams, spec)
    P, t = p.max_positions, learned(p)
    num, den = psi_tables(p, t)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731

    class Fire(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("num", f32(num))  # (P,) psi(c d)
            self.register_buffer("den", f32(den))  # (P,) psi(c max(i, L)) + eps
            self.register_buffer("w1", f32(t["w1"]))  # (W,)
            self.register_buffer("b1", f32(t["b1"]))  # (W,)
            self.register_buffer("w2", f32(t["w2"].T))  # (W, H)
            self.register_buffer("b2", f32(t["b2"]))  # (H,)

        def forward(self, query_positions, key_positions):  # (Q,), (K,) -> (1, H, Q, K)
            q, k = guard(query_positions, P), guard(key_positions, P)  # out of range -> P
            bad = (q[:, None] == P) | (k[None, :] == P)
            d = q[:, None] - k[None, :]  # (Q, K)
            x = take(self.num, torch.where(bad, P, d.abs())) / take(self.den, q)[:, None]  # (Q, K)
            h = torch.relu(x[..., None] * self.w1 + self.b1)  # (Q, K, W)
            bias = (h @ self.w2 + self.b2).permute(2, 0, 1)  # (H, Q, K)
            bias = mask_later_keys(bias, d < 0)
            return bias.to(torch_dtype(spec.dtype))[None]

    return Fire().eval()


def derived(spec) -> dict:
    p = parse(FireParams, spec)
    t = learned(p)
    return {"c": float(t["c"]), "L": abs(float(t["L_multiplier"]) * p.init_L)}


ENCODINGS.register("fire")(
    Encoding(
        name="fire",
        params=FireParams,
        module=module,
        reference=reference,
        magnitude=magnitude,
        derived=derived,
        **contract("bias", FireParams),
        reference_impl="the FIRE reproduction in mcleish7/arithmetic cramming/architectures/embeddings.py "
        "(transcribed; no official code)",
    )
)
