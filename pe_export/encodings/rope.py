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

Computed tables (`tables="computed"`, `pe_export.encodings.modules.ComputedTablesRotary`): cos/sin computed in
the graph from the positions in float32, as transformers' forward does: `inv_freq` (R/2,) is the one
constant, rounded once to float32; angle = float(position) * inv_freq in float32; Cos, Sin, the
attention factor, a cast to the export dtype. The file holds R/2 floats instead of 2 * P * R/2.

**Accuracy of computed tables.** With float64 angles as the truth (`angles="float64"`), the graph's
float32 angle `fl(fl(inv_freq) * p)` is off by at most `2^-23 * p * inv_freq[m]` (two roundings of
relative size 2^-24; positions are exact in float32 below 2^24), and moving a rotation of the pair
(a, b) by dθ moves the output by at most |dθ| * F * (|a| + |b|). Float32 Cos/Sin themselves are off by
at most 1.72 * 2^-24 (measured: ONNX Runtime 1.32 CPU, 4M arguments in [0, 131072]; torch 0.60, NumPy
1.18 in the same units; ONNX does not specify an accuracy for Cos), and the float32 attention factor
adds two more roundings of F: `COS_SIN_ERROR = 2^-22` covers both. So each output element gets
    F * (|a| + |b|) * (2^-23 * p * inv_freq[m] + 2^-22)
on top of the table-rounding bound (`rope_magnitude` adds it). The angle term grows with the position:
measured max abs error of cos/sin vs float64, Llama 3 (theta 5e5, R = 128), ORT CPU, fp32: 1.0e-4 at
position 8191 and 2.1e-3 at 131071 (constant tables: 2.9e-8 at both; the bound's angle term there is
2^-23 * p = 9.8e-4 and 1.6e-2 at the fastest frequency). With `angles="float32"` the graph's angles are
transformers' float32 angles bit for bit (3.0e-4 and 3.7e-3 from float64, as transformers' own
forward), the truth uses them too, and only Cos/Sin's own error remains. Dynamic NTK at run time
already computes cos/sin in the graph (in float64) and refuses `tables="computed"`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from pe_export.custom_ops.rotation import apply_reference, apply_torch, heads_axis  # noqa: F401 (re-exported)
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.contracts import CONTRACTS
from pe_export.encodings.probes import position_cases
from pe_export.encodings.size import check_size
from pe_export.scaling import SCALING_RULES, check_param, rule_params
from pe_export.spec import LAYOUTS, OP_NAMES

PAIRINGS = ("half", "interleaved")
ANGLES = ("float64", "float32")
TABLES = ("constant", "computed")
COS_SIN_ERROR = 2.0**-22  # float32 Cos/Sin (<= 1.72 * 2^-24 measured) and the float32 attention factor
ANGLE_ULP = 2.0**-23  # relative error of fl(fl(inv_freq) * p) in float32
FLOAT32_EXACT_POSITIONS = 2**24  # positions above this are not integers in float32


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
    # "computed": cos/sin computed in the graph in float32 (pe_export.encodings.modules.ComputedTablesRotary)
    tables: str = "constant"

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
        check_size(
            self.max_positions, stored=4 * self.rotary_dim, working=24 * self.rotary_dim
        )  # float32 cos and sin (P, R/2)
        inv_freq(self)  # the rule validates its values
        check_computed_tables(self)
        if self.angles == "float32" and computed_in_graph(self):
            # In the graph the runtime's own float32 Pow and Cos decide the bits, not torch's: transformers'
            # float32 arithmetic cannot be reproduced there, so do not pretend to.
            raise ValueError(
                f"angles 'float32' cannot be reproduced by a graph that computes its frequencies at run time "
                f"({self.scaling!r} in mode 'runtime'); use angles 'float64' or mode 'fixed'"
            )

    # The calls pe_export.encodings.modules makes, so that the torch modules need no import of this file.
    def frequencies(self, seq_len: int | None = None) -> tuple[np.ndarray, float]:
        return inv_freq(self, seq_len)

    def cos_sin(self, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return tables(self, seq_len)

    def switch(self) -> int | None:
        return switch_at(self)

    def runtime_frequencies(self) -> bool:
        return computed_in_graph(self)


def with_overrides(
    base: dict,
    *,
    scaling_updates: dict | None = None,
    longrope_mode: str | None = None,
    dynamic_mode: str | None = None,
    **fields,
) -> dict:
    """RoPE parameters `base` (a preset's or a config's) with a user's changes, as the CLI's options and
    `pe_export.preset` apply them. `fields` (None: unchanged) replace the base's; a new `scaling` rule
    starts from no parameters unless `scaling_params` is given; `scaling_updates` then changes single
    rule parameters; a LongRoPE or dynamic rule always records its mode (default "runtime"), so the
    file says which semantics it has; a new `head_dim` keeps the base's rotary fraction, as
    transformers' `partial_rotary_factor` does, unless `rotary_dim` is given."""
    fields = {k: v for k, v in fields.items() if v is not None}
    params = {**base, **fields}
    if "scaling" in fields and fields["scaling"] != base.get("scaling") and "scaling_params" not in fields:
        params["scaling_params"] = {}
    if scaling_updates:
        params["scaling_params"] = {**params.get("scaling_params", {}), **scaling_updates}
    for rule, chosen in (("longrope", longrope_mode), ("dynamic", dynamic_mode)):
        if params.get("scaling") == rule:
            params["scaling_params"] = {**params.get("scaling_params", {})}
            params["scaling_params"]["mode"] = chosen or params["scaling_params"].get("mode", "runtime")
        elif chosen is not None:
            raise ValueError(
                f"--{rule}-mode applies to the {rule} scaling rule; this export uses "
                f"{params.get('scaling', 'default')!r}"
            )
    if "head_dim" in fields and "rotary_dim" not in fields and "rotary_dim" in base:
        params["rotary_dim"] = int(fields["head_dim"] * base["rotary_dim"] / base["head_dim"])
    return params


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
        theta=p.theta,
        rotary_dim=p.rotary_dim,
        max_positions=p.max_positions,
        dtype=dtype,
        seq_len=seq_len,
        **p.scaling_params,
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
        f"--seq {p.max_positions} <= original_max_positions {at}: this file never reaches the {p.scaling} rule's "
        f"switch "
        f"(a call must reach position {at}), so it always uses the "
        f"{'short factors' if p.scaling == 'longrope' else 'unscaled base'}"
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


# ---------------------------------------------------------------------------------------------------
# The encoding as pe-export exports and verifies it. Contract of the exported graph:
#   x (B, H, S, D) [bhsd] or (B, S, H, D) [bshd], float; position_ids (B, S) int64 -> y like x.


def rope_module(spec):
    """The PyTorch original of a RoPE spec: one of pe_export.encodings.modules' RoPE modules, in eval mode."""
    from pe_export.encodings.modules import ComputedTablesRotary, RotaryEmbedding, RuntimeRotary

    p = parse(RopeParams, spec)
    cls = RuntimeRotary if computed_in_graph(p) else ComputedTablesRotary if p.tables == "computed" else RotaryEmbedding
    return cls(p, layout=spec.layout, dtype=spec.dtype).eval()


def rope_example_inputs(spec):
    """Example args, dynamic shapes, input and output names for torch.onnx.export."""
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(RopeParams, spec)
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

    p = parse(RopeParams, spec)
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
    p = parse(RopeParams, spec)
    ids = inputs["position_ids"]
    cos, sin = tables(p, seq_len=int(ids.max()) + 1 if ids.size else None)  # the regime, as transformers picks it
    x = np.asarray(inputs["x"]).astype(np.float64)
    return apply_reference(
        x, cos, sin, inputs["position_ids"], pairing=p.pairing, rotary_dim=p.rotary_dim, layout=spec.layout
    )


def computed_tables_slack(spec, p, inputs) -> np.ndarray | float:
    """Per rotated element, the factor by which computed tables widen the rounding magnitude:
    1 + (2^-23 * p * inv_freq[m] + COS_SIN_ERROR) / eps(dtype); 1 for constant tables. Broadcasts to
    x[..., :R]. The angle term is 0 with angles="float32" (the truth uses the same float32 angles)."""
    if getattr(p, "tables", "constant") != "computed":
        return 1.0
    from pe_export.dtypes import EPS

    ids = np.asarray(inputs["position_ids"])
    freqs, _ = inv_freq(p, seq_len=int(ids.max()) + 1 if ids.size else None)
    angle_error = (
        0.0 if p.angles == "float32" else ANGLE_ULP * ids[..., None].astype(np.float64) * np.abs(freqs)
    )  # (B, S, R/2)
    term = np.broadcast_to(1.0 + (angle_error + COS_SIN_ERROR) / EPS[spec.dtype], (*ids.shape, len(freqs)))
    term = np.concatenate([term, term], axis=-1) if p.pairing == "half" else np.repeat(term, 2, axis=-1)  # (B, S, R)
    return np.expand_dims(term, heads_axis(spec.layout))


def check_computed_tables(p) -> None:
    """Refuse what computed tables cannot express (called from RopeParams.__post_init__)."""
    if p.tables not in TABLES:
        raise ValueError(f"tables must be one of {', '.join(TABLES)}, got {p.tables!r}")
    if p.tables != "computed":
        return
    if computed_in_graph(p):
        raise ValueError(
            f"tables 'computed' does not apply to {p.scaling!r} in mode 'runtime': that graph computes cos/sin "
            f"from the positions already (in float64); drop --tables computed or use mode 'fixed'"
        )
    if p.max_positions > FLOAT32_EXACT_POSITIONS:
        raise ValueError(
            f"tables 'computed' takes max_positions (--seq) <= 2^24 = {FLOAT32_EXACT_POSITIONS} (positions above it "
            f"are not exact in float32), got {p.max_positions}"
        )


def pair_sums(x: np.ndarray, pairing: str, rotary_dim: int) -> np.ndarray:
    """(..., R) |a| + |b| of the pair (a, b) each rotated element of x (..., D) belongs to."""
    x = np.abs(np.asarray(x).astype(np.float64))
    R = rotary_dim
    if pairing == "half":
        m = x[..., : R // 2] + x[..., R // 2 : R]
        return np.concatenate([m, m], axis=-1)
    return np.repeat(x[..., 0:R:2] + x[..., 1:R:2], 2, axis=-1)


def rope_magnitude(spec, inputs: dict) -> np.ndarray:
    """Per output element: attention_factor * (|a| + |b|) of its pair (a, b); |x| on the pass-through tail."""
    p = parse(RopeParams, spec)
    x = np.asarray(inputs["x"])
    pair = pair_sums(x, p.pairing, p.rotary_dim)
    tail = np.abs(x[..., p.rotary_dim :].astype(np.float64))
    return np.concatenate([pair * inv_freq(p)[1] * computed_tables_slack(spec, p, inputs), tail], axis=-1)


rope_locate = CONTRACTS["rotary"].locate


def rope_derived(spec) -> dict:
    """The attention factor already in cos/sin, and the softmax-scale multiplier a rule asks of attention
    (DeepSeek-style YaRN), which no RoPE graph can apply."""
    p = parse(RopeParams, spec)
    derived = {"attention_factor": inv_freq(p)[1]}
    softmax = getattr(SCALING_RULES.get(p.scaling), "softmax_scale_factor", None)
    if softmax is not None:
        derived["softmax_scale_factor"] = softmax(**p.scaling_params)
    return derived


def rope_translation_table(spec) -> dict:
    from pe_export.custom_ops.rotary import translation_table

    return translation_table(spec.op)


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
