"""Multimodal rotary position embedding (M-RoPE; Qwen2-VL, Wang et al., arXiv 2409.12191).

Each token has three positions, temporal, height and width: position_ids (3, B, S). The R/2 rotary
pairs are split among the three components by `mrope_section` [t, h, w] (pair counts, summing to
R/2); pair j takes its angle from the position of its component c(j): angle = position[c(j)] *
inv_freq[j]. Two layouts, both in transformers 5.23:

- chunked (Qwen2-VL, Qwen2.5-VL): `Qwen2VLRotaryEmbedding.recomposition_frequencies` splits the R/2
  angles into contiguous sections [t | h | w] and takes section i from component i % 3;
- interleaved (Qwen3-VL, `mrope_interleaved`): `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`
  takes pair j from H when j % 3 == 1 and j < 3 * h, from W when j % 3 == 2 and j < 3 * w, else from T.

Must match those two `recomposition_frequencies` and `apply_rotary_pos_emb` (transformers 5.23). Text
tokens carry three equal positions, and M-RoPE then equals plain RoPE at that position.

The math reuses rope.py: the one (P, R/2) cos/sin table of a RopeParams (float64, rounded once); a
token's cos/sin row is selected entry by entry from the rows of its three positions (no arithmetic,
so no rounding beyond the table's). The graph gathers each component's columns at that component's
positions, concatenates them and restores the pair order with one constant Gather, then rotates with
`pe_export::rotary_embedding` (every op target: `onnx`, `ort`, `decomposed`) on the per-token rows as a
(B*S, R/2) table read at positions 0 .. B*S - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_export.custom_ops.rotation import apply_reference
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.contracts import CONTRACTS
from pe_export.encodings.rope import (
    RopeParams,
    computed_in_graph,
    inv_freq,
    pair_sums,
    rope_translation_table,
    switch_at,
    tables,
)
from pe_export.spec import LAYOUTS, OP_NAMES

COMPONENTS = ("temporal", "height", "width")


@dataclass(frozen=True, kw_only=True)
class MropeParams(RopeParams):
    mrope_section: list  # [t, h, w] rotary pairs per component, summing to R/2
    mrope_interleaved: bool = False  # Qwen3-VL's layout; False: Qwen2-VL's chunked sections

    def __post_init__(self):
        super().__post_init__()
        s = self.mrope_section
        if (
            not isinstance(s, (list, tuple))
            or len(s) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in s)
        ):
            raise ValueError(f"mrope_section must be 3 integers >= 0 [t, h, w], got {s!r}")
        object.__setattr__(self, "mrope_section", [int(n) for n in s])
        if sum(s) != self.rotary_dim // 2:
            raise ValueError(
                f"mrope_section must sum to rotary_dim / 2 = {self.rotary_dim // 2} (pairs), got {list(s)} "
                f"(sum {sum(s)})"
            )
        counts = np.bincount(component_of_pair(self), minlength=3).tolist()
        if counts != list(s):
            # Interleaved: H takes j = 1, 4, ... < 3h, so 3h and 3w must fit in R/2 for the counts to hold.
            raise ValueError(
                f"mrope_section {list(s)} interleaved gives {counts} pairs per component; 3 * h and 3 * w must "
                f"be <= rotary_dim / 2 = {self.rotary_dim // 2}"
            )
        if self.tables != "constant" or computed_in_graph(self) or switch_at(self) is not None:
            raise ValueError(
                "mrope takes constant tables and a scaling rule without a run-time switch (its three positions "
                f"have no single sequence length); got tables {self.tables!r}, scaling {self.scaling!r}"
            )

    # The call pe_export.encodings.modules.MRotaryEmbedding makes (besides RopeParams' own).
    def pair_components(self) -> np.ndarray:
        return component_of_pair(self)


# ---------------------------------------------------------------------------------------------------
# The pure functions (NumPy): which component each pair reads, and the per-token tables.


def component_of_pair(p: MropeParams) -> np.ndarray:
    """(R/2,) int64: the component (0 temporal, 1 height, 2 width) whose position pair j rotates by."""
    half = p.rotary_dim // 2
    t, h, w = p.mrope_section
    if not p.mrope_interleaved:
        # Qwen2-VL: contiguous sections, section i from component i % 3.
        return np.repeat(np.arange(3, dtype=np.int64), [t, h, w])[:half]
    j = np.arange(half)
    return np.where((j % 3 == 1) & (j < 3 * h), 1, np.where((j % 3 == 2) & (j < 3 * w), 2, 0)).astype(np.int64)


def select_sections(per_component: np.ndarray, p: MropeParams) -> np.ndarray:
    """(3, ..., R/2) rows of each component -> (..., R/2): pair j from component c(j)."""
    c = component_of_pair(p)  # (R/2,)
    return np.take_along_axis(per_component, np.broadcast_to(c, (1, *per_component.shape[1:])), axis=0)[0]


def check_positions(p: MropeParams, positions: np.ndarray) -> None:
    positions = np.asarray(positions)
    if positions.ndim != 3 or positions.shape[0] != 3:
        raise ValueError(f"M-RoPE position_ids must be (3, B, S) (temporal, height, width), got {positions.shape}")
    if positions.size and (positions.min() < 0 or positions.max() >= p.max_positions):
        raise IndexError(f"position out of range [0, {p.max_positions})")


def mrope_tables(p: MropeParams, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-token cos and sin, each (B, S, R/2), attention factor included, for position_ids
    (3, B, S) each in [0, max_positions). Round once to the target dtype."""
    check_positions(p, positions)
    cos, sin = tables(p)  # (P, R/2)
    return select_sections(cos[positions], p), select_sections(sin[positions], p)  # (3, B, S, R/2) -> (B, S, R/2)


def text_positions(positions: np.ndarray) -> np.ndarray:
    """(B, S) text positions -> (3, B, S): a text token has the same position in all three components."""
    return np.broadcast_to(np.asarray(positions), (3, *np.shape(positions))).copy()


# ---------------------------------------------------------------------------------------------------
# The encoding as pe-export exports and verifies it. Contract of the exported graph:
#   x (B, H, S, D) [bhsd] or (B, S, H, D) [bshd], float; position_ids (3, B, S) int64 -> y like x.


def mrope_module(spec):
    """The PyTorch original: `pe_export.encodings.modules.MRotaryEmbedding`, in eval mode."""
    from pe_export.encodings.modules import MRotaryEmbedding

    return MRotaryEmbedding(parse(MropeParams, spec), layout=spec.layout, dtype=spec.dtype).eval()


def mrope_example_inputs(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(MropeParams, spec)
    B, H, S = 2, 3, min(5, p.max_positions)
    shape = (B, H, S, p.head_dim) if spec.layout == "bhsd" else (B, S, H, p.head_dim)
    x = torch.zeros(shape, dtype=torch_dtype(spec.dtype))
    position_ids = torch.zeros((3, B, S), dtype=torch.int64)
    batch, heads, seq = torch.export.Dim("batch"), torch.export.Dim("heads"), torch.export.Dim("seq")
    x_dims = {0: batch, 1: heads, 2: seq} if spec.layout == "bhsd" else {0: batch, 1: seq, 2: heads}
    return (x, position_ids), {"x": x_dims, "position_ids": {1: batch, 2: seq}}, ["x", "position_ids"], ["y"]


def mrope_position_cases(P: int, rng: np.random.Generator, batch: int) -> list[tuple[str, np.ndarray]]:
    """(name, position_ids (3, B, S)): text (three equal positions) spread to the last row; an image
    (two frames of a g x g patch grid, T, H and W all different and each reaching P - 1, batch rows
    shifted); independent random components; a decode step (S = 1) at large, different T, H, W; and
    every row of every component once (B = 1, H and W reversed and rolled against T)."""
    S = min(P, 64)
    text = np.empty((batch, S), dtype=np.int64)
    text[0] = np.round(np.linspace(0, P - 1, S))
    for b in range(1, batch):
        text[b] = rng.integers(0, P, S)
        text[b, -1] = P - 1
    g = int(np.ceil(np.sqrt(S)))
    k = np.arange(S)
    image = np.stack([P - 1 - (k % 2), P - g + k // g, P - g + k % g])  # (3, S)
    image = np.stack([image - b for b in range(batch)], axis=1)  # (3, B, S): each batch row shifted
    image = np.clip(image, 0, P - 1)
    scattered = rng.integers(0, P, (3, batch, S))
    scattered[:, 0, -1] = P - 1
    decode = np.array([[P - 1 - b, P - 2 - b, P - 3 - b] for b in range(batch)], dtype=np.int64).T[:, :, None]
    every = np.arange(P, dtype=np.int64)
    every = np.stack([every, every[::-1], np.roll(every, P // 3)])[:, None, :]  # (3, 1, P)
    return [
        ("text", text_positions(text)),
        ("image", image.astype(np.int64)),
        ("scattered", scattered.astype(np.int64)),
        ("decode", np.clip(decode, 0, P - 1)),
        ("all", every),
    ]


def mrope_probes(spec, rng: np.random.Generator, batch: int = 2) -> list[tuple[str, dict]]:
    """Every case of `mrope_position_cases` with x of three heads (one head for "all")."""
    from pe_export.dtypes import numpy_dtype

    p = parse(MropeParams, spec)

    def x_for(ids, heads):
        _, B, S = ids.shape
        shape = (B, heads, S, p.head_dim) if spec.layout == "bhsd" else (B, S, heads, p.head_dim)
        return rng.standard_normal(shape, dtype=np.float32).astype(numpy_dtype(spec.dtype))

    cases = mrope_position_cases(p.max_positions, rng, batch)
    return [(name, {"x": x_for(ids, 1 if name == "all" else 3), "position_ids": ids}) for name, ids in cases]


def mrope_reference(spec, inputs: dict) -> np.ndarray:
    """float64 truth from the spec alone: exact per-token tables, NumPy arithmetic."""
    p = parse(MropeParams, spec)
    cos, sin = mrope_tables(p, inputs["position_ids"])  # (B, S, R/2)
    B, S, half = cos.shape
    tokens = np.arange(B * S, dtype=np.int64).reshape(B, S)  # row of each token in the (B*S, R/2) table
    return apply_reference(
        inputs["x"],
        cos.reshape(B * S, half),
        sin.reshape(B * S, half),
        tokens,
        pairing=p.pairing,
        rotary_dim=p.rotary_dim,
        layout=spec.layout,
    )


def mrope_magnitude(spec, inputs: dict) -> np.ndarray:
    """Per output element: attention_factor * (|a| + |b|) of its pair; |x| on the pass-through tail."""
    p = parse(MropeParams, spec)
    x = np.asarray(inputs["x"])
    pair = pair_sums(x, p.pairing, p.rotary_dim)
    return np.concatenate([pair * inv_freq(p)[1], np.abs(x[..., p.rotary_dim :].astype(np.float64))], axis=-1)


def mrope_derived(spec) -> dict:
    """The attention factor already in cos/sin."""
    return {"attention_factor": inv_freq(parse(MropeParams, spec))[1]}


MROPE = ENCODINGS.register("mrope")(
    Encoding(
        name="mrope",
        params=MropeParams,
        module=mrope_module,
        example_inputs=mrope_example_inputs,
        probes=mrope_probes,
        reference=mrope_reference,
        translation_table=rope_translation_table,
        magnitude=mrope_magnitude,
        locate=CONTRACTS["mrotary"].locate,
        derived=mrope_derived,
        kind="mrotary",
        ops=OP_NAMES,
        layouts=LAYOUTS,
        reference_impl="transformers 5.23 Qwen2VLRotaryEmbedding / Qwen3VLTextRotaryEmbedding "
        "recomposition_frequencies, apply_rotary_pos_emb",
    )
)
