"""Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864).

Must match transformers 5.23: `LlamaRotaryEmbedding` / `apply_rotary_pos_emb` / `rotate_half` for the
`half` pairing (GPT-NeoX, Llama-HF: pairs (i, i + R/2)), and `modeling_gptj.apply_rotary_pos_emb` /
`rotate_every_two` for the `interleaved` pairing (GPT-J, Meta's reference: pairs (2i, 2i + 1)).
Partial rotary rotates `x[..., :R]` and passes `x[..., R:]` through.

For every pair (a, b) at position p and frequency index m, with angle p * inv_freq[m]:
    a' = a * cos - b * sin,   b' = b * cos + a * sin,
where cos and sin are already multiplied by `attention_factor` (as transformers' `attention_scaling`).

Tables are built in float64 and cast once. `angles="float32"` instead reproduces transformers'
forward, which forms `inv_freq` and the positions in float32 and multiplies them in float32; only
cos/sin of those float32 angles is then taken in float64. The float32 `inv_freq` is computed with
torch's float32 ops exactly as transformers computes it (see `pe_export/scaling`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from pe_export.encodings import ENCODINGS, Encoding
from pe_export.encodings.common import position_cases
from pe_export.encodings.size import check_size
from pe_export.scaling import SCALING_RULES, check_param, rule_params
from pe_export.spec import LAYOUTS, OP_NAMES

PAIRINGS = ("half", "interleaved")
ANGLES = ("float64", "float32")


@dataclass(frozen=True, kw_only=True)
class RopeParams:
    head_dim: int
    theta: float = 10000.0
    rotary_dim: int | None = None  # None: the whole head
    pairing: str = "half"
    max_positions: int = 2048
    attention_factor: float = 1.0
    scaling: str = "default"
    scaling_params: dict = field(default_factory=dict)  # the rule's own parameters (factor, ...)
    angles: str = "float64"
    tables: str = "constant"  # "computed": cos/sin computed in the graph in float32 (pe_export.deploy)

    def __post_init__(self):
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2, got {self.head_dim}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and >= 2, got {self.rotary_dim}")
        if self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be <= head_dim ({self.head_dim}), got {self.rotary_dim}")
        if not (self.theta > 0 and np.isfinite(self.theta)):
            raise ValueError(f"theta must be a finite number > 0, got {self.theta}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions (--seq) must be >= 1, got {self.max_positions}")
        if not (self.attention_factor > 0 and np.isfinite(self.attention_factor)):
            raise ValueError(f"attention_factor must be a finite number > 0, got {self.attention_factor}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if self.angles not in ANGLES:
            raise ValueError(f"angles must be one of {', '.join(ANGLES)}, got {self.angles!r}")
        check_scaling_params(self.scaling, self.scaling_params)
        check_size(self.max_positions, stored=4 * self.rotary_dim, working=24 * self.rotary_dim)  # float32 cos and sin (P, R/2)
        inv_freq(self)  # the rule validates its values
        from pe_export.deploy import check_computed_tables

        check_computed_tables(self)
        if self.angles == "float32" and computed_in_graph(self):
            # In the graph the runtime's own float32 Pow and Cos decide the bits, not torch's: transformers'
            # float32 arithmetic cannot be reproduced there, so do not pretend to.
            raise ValueError(
                f"angles 'float32' cannot be reproduced by a graph that computes its frequencies at run time "
                f"({self.scaling!r} in mode 'runtime'); use angles 'float64' or mode 'fixed'"
            )


def check_scaling_params(name: str, params: dict) -> None:
    """Unknown or missing parameters of a scaling rule, named, with what the rule takes."""
    sig = rule_params(name)
    takes = ", ".join(sig) or "no parameters"
    unknown = sorted(set(params) - set(sig))
    missing = sorted(k for k, v in sig.items() if v.default is inspect.Parameter.empty and k not in params)
    if unknown:
        raise ValueError(f"scaling rule {name!r} has no parameter {unknown[0]!r}; it takes: {takes}")
    if missing:
        raise ValueError(f"scaling rule {name!r} needs {missing[0]!r}; it takes: {takes}")
    for key, value in params.items():
        check_param(name, key, value, sig[key].annotation)


def inv_freq(p: RopeParams, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """(R/2,) inverse frequencies (float64 array) and the attention factor, from the scaling rule, for
    a call whose largest position is `seq_len - 1` (only switching rules read it).

    The rule runs in float64, or in float32 to reproduce transformers' arithmetic (`angles="float32"`)."""
    import torch

    dtype = torch.float32 if p.angles == "float32" else torch.float64
    rule = SCALING_RULES.get(p.scaling)
    freqs, factor = rule(
        theta=p.theta, rotary_dim=p.rotary_dim, max_positions=p.max_positions, dtype=dtype, seq_len=seq_len, **p.scaling_params
    )
    return freqs.double().numpy(), float(factor) * p.attention_factor


def computed_in_graph(p: RopeParams) -> bool:
    """True when the rule's frequencies are a continuous function of the positions (dynamic NTK at run
    time): the graph then computes cos/sin itself instead of reading a table."""
    in_graph = getattr(SCALING_RULES.get(p.scaling), "in_graph", None)
    return bool(in_graph and in_graph(**p.scaling_params))


def switch_at(p: RopeParams) -> int | None:
    """The seq_len (max position + 1) above which the frequencies switch at run time, if the rule does
    and the table reaches past it."""
    switch = getattr(SCALING_RULES.get(p.scaling), "switch", None)
    at = switch(**p.scaling_params) if switch else None
    return at if at is not None and at < p.max_positions else None


def switch_note(p: RopeParams) -> str | None:
    """A note for a table too short to reach its rule's run-time switch (a legitimate export that
    behaves like the unscaled or short-factor rule everywhere; worth saying)."""
    switch = getattr(SCALING_RULES.get(p.scaling), "switch", None)
    at = switch(**p.scaling_params) if switch else None
    if at is None or at < p.max_positions:
        return None
    return (
        f"--seq {p.max_positions} <= original_max_positions {at}: this file never reaches the {p.scaling} rule's switch "
        f"(a call must reach position {at}), so it always uses the {'short factors' if p.scaling == 'longrope' else 'unscaled base'}"
    )


def angles(p: RopeParams, positions: np.ndarray, seq_len: int | None = None) -> np.ndarray:
    """Angles `position * inv_freq`, float64 of shape positions.shape + (R/2,)."""
    freqs, _ = inv_freq(p, seq_len)
    pos = np.asarray(positions)[..., None]
    if p.angles == "float32":
        # transformers: inv_freq.float() @ position_ids.float(), everything float32.
        return (pos.astype(np.float32) * freqs.astype(np.float32)).astype(np.float64)
    return pos.astype(np.float64) * freqs


def tables(p: RopeParams, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 cos and sin tables, each (max_positions, R/2), attention factor included, for calls
    whose largest position is `seq_len - 1`."""
    theta = angles(p, np.arange(p.max_positions), seq_len)  # (P, R/2)
    _, factor = inv_freq(p, seq_len)
    return np.cos(theta) * factor, np.sin(theta) * factor


def heads_axis(layout: str) -> int:
    return LAYOUTS.index(layout) + 1  # bhsd: 1, bshd: 2


def apply_reference(
    x: np.ndarray, cos: np.ndarray, sin: np.ndarray, position_ids: np.ndarray, *, pairing: str, rotary_dim: int, layout: str
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


# ---------------------------------------------------------------------------------------------------
# The encoding as pe-export exports and verifies it. Contract of the exported graph:
#   x (B, H, S, D) [bhsd] or (B, S, H, D) [bshd], float; position_ids (B, S) int64 -> y like x.


def rope_module(spec):
    import torch

    import pe_export.custom_ops.rotary  # noqa: F401  registers torch.ops.pe_export.rotary_embedding
    from pe_export.dtypes import torch_dtype

    p = RopeParams(**spec.params)
    if computed_in_graph(p):
        return ComputedRopeModule(spec)
    if p.tables == "computed":
        from pe_export.deploy import computed_tables_module

        return computed_tables_module(spec)
    P, switch = p.max_positions, switch_at(p)
    cos, sin = tables(p)
    if switch is not None:
        # Two regimes in one table: rows [0, P) for seq_len <= switch, rows [P, 2P) beyond (2P, R/2).
        cos_long, sin_long = tables(p, seq_len=switch + 1)
        cos, sin = np.concatenate([cos, cos_long]), np.concatenate([sin, sin_long])

    class RopeModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # float64 -> export dtype, rounded once.
            self.register_buffer("cos_table", torch.from_numpy(cos).to(torch_dtype(spec.dtype)))  # (P or 2P, R/2)
            self.register_buffer("sin_table", torch.from_numpy(sin).to(torch_dtype(spec.dtype)))

        def forward(self, x, position_ids):
            if switch is not None:
                # As transformers: one regime for the whole call, chosen by max(position_ids) + 1. Positions
                # outside [0, P) go to row 2P, past both tables, so they still fail rather than read a row.
                long = (position_ids.max() + 1 > switch).to(position_ids.dtype)
                bad = (position_ids < 0) | (position_ids >= P)
                position_ids = torch.where(bad, 2 * P, position_ids + long * P)
            return torch.ops.pe_export.rotary_embedding(
                x, self.cos_table, self.sin_table, position_ids, p.pairing == "interleaved", p.rotary_dim, spec.layout
            )

    return RopeModule().eval()


def ComputedRopeModule(spec):
    """RoPE whose cos/sin the graph computes from the positions of each call (no table), with the
    scaling rule's own torch code run on the traced `seq_len = max(position_ids) + 1`. The per-call
    cos/sin, (B*S, R/2), go to the same custom op as a table read at rows arange(B*S)."""
    import torch

    import pe_export.custom_ops.rotary  # noqa: F401
    from pe_export.dtypes import torch_dtype

    p = RopeParams(**spec.params)  # angles "float64": float32 is refused for in-graph rules
    rule, P = SCALING_RULES.get(p.scaling), p.max_positions
    math_dtype = torch.float64
    half = p.rotary_dim // 2

    class Module(torch.nn.Module):
        def forward(self, x, position_ids):
            B, S = position_ids.shape
            freqs, factor = rule(
                theta=p.theta, rotary_dim=p.rotary_dim, max_positions=P, dtype=math_dtype,
                seq_len=position_ids.max() + 1, **p.scaling_params,
            )  # fmt: skip
            angles = position_ids.to(math_dtype)[..., None] * freqs  # (B, S, R/2)
            factor = factor * p.attention_factor
            cos = (torch.cos(angles) * factor).to(torch_dtype(spec.dtype)).reshape(B * S, half)  # (B*S, R/2)
            sin = (torch.sin(angles) * factor).to(torch_dtype(spec.dtype)).reshape(B * S, half)
            rows = torch.arange(B * S, dtype=torch.int64).reshape(B, S)
            # Positions outside [0, P) point past the per-call table, so the call fails as with a table.
            rows = torch.where((position_ids < 0) | (position_ids >= P), B * S, rows)
            return torch.ops.pe_export.rotary_embedding(x, cos, sin, rows, p.pairing == "interleaved", p.rotary_dim, spec.layout)

    return Module().eval()


def rope_example_inputs(spec):
    """Example args, dynamic shapes, input and output names for torch.onnx.export."""
    import torch

    from pe_export.dtypes import torch_dtype

    p = RopeParams(**spec.params)
    B, H, S = 2, 3, min(5, p.max_positions)
    shape = (B, H, S, p.head_dim) if spec.layout == "bhsd" else (B, S, H, p.head_dim)
    x = torch.zeros(shape, dtype=torch_dtype(spec.dtype))
    position_ids = torch.zeros((B, S), dtype=torch.int64)
    batch, heads, seq = torch.export.Dim("batch"), torch.export.Dim("heads"), torch.export.Dim("seq")
    x_dims = {0: batch, 1: heads, 2: seq} if spec.layout == "bhsd" else {0: batch, 1: seq, 2: heads}
    dynamic = {"x": x_dims, "position_ids": {0: batch, 1: seq}}
    return (x, position_ids), dynamic, ["x", "position_ids"], ["y"]


def rope_probes(spec, rng: np.random.Generator, batch: int = 2) -> list[tuple[str, dict]]:
    """Inputs that cover the whole table: spread positions ending in the last row, the last block
    (prefill near the end), a decode step (S = 1 at a large position), all with three heads (an odd
    count) and `batch` rows; and every row of the table once."""
    from pe_export.dtypes import numpy_dtype

    p = RopeParams(**spec.params)
    P, H = p.max_positions, 3
    S = min(P, 64)

    def x_for(ids, heads):
        B, S = ids.shape
        shape = (B, heads, S, p.head_dim) if spec.layout == "bhsd" else (B, S, heads, p.head_dim)
        return rng.standard_normal(shape, dtype=np.float32).astype(numpy_dtype(spec.dtype))

    # "all" reads every table row once (one head, one batch row), so no corrupted or wrong row goes unseen.
    cases = [(name, ids, 1 if name == "all" else H) for name, ids in position_cases(P, rng, batch)]
    switch = switch_at(p)
    if switch is not None:
        # Both sides of a run-time switch: largest position switch - 1 (seq_len = switch: the short
        # regime, every short row once) and switch (one past: the long regime).
        cases.append(("short", np.arange(switch, dtype=np.int64)[None, :], 1))
        at_switch = np.round(np.linspace(0, switch, S)).astype(np.int64)
        cases.append(("switch", np.broadcast_to(at_switch, (batch, S)).copy(), H))
    return [(name, {"x": x_for(ids, heads), "position_ids": ids}) for name, ids, heads in cases]


def rope_reference(spec, inputs: dict) -> np.ndarray:
    """float64 truth from the spec alone: exact tables, NumPy arithmetic."""
    p = RopeParams(**spec.params)
    ids = inputs["position_ids"]
    cos, sin = tables(p, seq_len=int(ids.max()) + 1 if ids.size else None)  # the regime, as transformers picks it
    x = np.asarray(inputs["x"]).astype(np.float64)
    return apply_reference(
        x, cos, sin, inputs["position_ids"], pairing=p.pairing, rotary_dim=p.rotary_dim, layout=spec.layout
    )


def rope_magnitude(spec, inputs: dict) -> np.ndarray:
    """Per output element: attention_factor * (|a| + |b|) of its pair (a, b); |x| on the pass-through tail."""
    p = RopeParams(**spec.params)
    x = np.abs(np.asarray(inputs["x"]).astype(np.float64))
    R = p.rotary_dim
    if p.pairing == "half":
        m = x[..., : R // 2] + x[..., R // 2 : R]
        pair = np.concatenate([m, m], axis=-1)
    else:
        pair = np.repeat(x[..., 0:R:2] + x[..., 1:R:2], 2, axis=-1)
    from pe_export.deploy import computed_tables_slack  # the float32 angle and Cos/Sin error of computed tables

    return np.concatenate([pair * inv_freq(p)[1] * computed_tables_slack(spec, p, inputs), x[..., R:]], axis=-1)


def rope_locate(spec, inputs: dict, at: tuple) -> str:
    b, s = at[0], (at[2] if spec.layout == "bhsd" else at[1])
    return f"batch {b}, position {int(inputs['position_ids'][b, s])}, dim {at[-1]}"


def rope_derived(spec) -> dict:
    """The attention factor already in cos/sin, and the softmax-scale multiplier a rule asks of attention
    (DeepSeek-style YaRN), which no RoPE graph can apply."""
    p = RopeParams(**spec.params)
    derived = {"attention_factor": inv_freq(p)[1]}
    softmax = getattr(SCALING_RULES.get(p.scaling), "softmax_scale_factor", None)
    if softmax is not None:
        derived["softmax_scale_factor"] = softmax(**p.scaling_params)
    return derived


def rope_translation_table(spec) -> dict:
    import torch

    import pe_export.custom_ops.rotary  # noqa: F401
    from pe_export.custom_ops.lowerings import OP_TARGETS

    return {torch.ops.pe_export.rotary_embedding.default: OP_TARGETS[spec.op].lower}


ROPE = ENCODINGS.register("rope")(
    Encoding(
        name="rope",
        params=RopeParams,
        module=rope_module,
        example_inputs=rope_example_inputs,
        probes=rope_probes,
        reference=rope_reference,
        translation_table=rope_translation_table,
        magnitude=rope_magnitude,
        locate=rope_locate,
        derived=rope_derived,
        kind="rotary",
        ops=OP_NAMES,
        layouts=LAYOUTS,
        reference_impl="transformers 5.23 LlamaRotaryEmbedding / apply_rotary_pos_emb, GPT-J rotate_every_two",
    )
)
