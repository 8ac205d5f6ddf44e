"""The torch modules of RoPE that a user puts in a model, and that pe-export exports and verifies.

    RotaryEmbedding       float64-built cos/sin tables as buffers, applied by the custom op
                          `pe_export::rotary_embedding`; LongRoPE's run-time switch in the graph
    ComputedTablesRotary  cos/sin computed in float32 from the positions (`tables="computed"`)
    RuntimeRotary         frequencies computed per call from max(position_ids) + 1 (dynamic NTK)
    MRotaryEmbedding      M-RoPE (Qwen2-VL, Qwen3-VL): position_ids (3, B, S), per-token rows selected from
                          the table at each component's position (pe_export.encodings.mrope)

Each takes a `RopeParams` (pe_export.encodings.rope) and calls only its methods, so this module needs
no import of the encoding above it. Shapes: x (B, H, S, D) for layout "bhsd", (B, S, H, D) for
"bshd"; position_ids (B, S) int64 in [0, P); y like x.
"""

from __future__ import annotations

import numpy as np
import torch

import pe_export.custom_ops.rotary  # noqa: F401  registers torch.ops.pe_export.rotary_embedding
from pe_export.dtypes import DTYPES, torch_dtype
from pe_export.encodings.table_reads import guard, take
from pe_export.errors import BadInput
from pe_export.scaling import SCALING_RULES
from pe_export.spec import LAYOUTS


def check_module_options(layout: str, dtype: str) -> None:
    if layout not in LAYOUTS:
        raise BadInput(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype not in DTYPES:
        raise BadInput(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


class RotaryEmbedding(torch.nn.Module):
    """RoPE on q or k inside attention: `forward(x, position_ids) -> y`.

    The cos/sin tables, (P, R/2) each (2P rows with a LongRoPE switch), are built in float64 with the
    attention factor applied and rounded once to `dtype`; they are buffers, so `.to(device)` moves them.
    Gradients flow to x (the custom op's backward is the inverse rotation). Export a model that holds
    it with `torch.onnx.export(..., dynamo=True, custom_translation_table=pe_export.translation_table(op))`.
    """

    def __init__(self, params, layout: str = "bhsd", dtype: str = "fp32"):
        super().__init__()
        check_module_options(layout, dtype)
        if params.runtime_frequencies() or params.tables == "computed":
            raise BadInput(
                f"RotaryEmbedding reads tables; {params.scaling!r} with tables {params.tables!r} and mode "
                f"{params.scaling_params.get('mode', 'runtime')!r} computes cos/sin per call: use mode 'fixed' or "
                f"tables 'constant'"
            )
        self.layout, self.interleaved, self.rotary_dim = layout, params.pairing == "interleaved", params.rotary_dim
        self.max_positions, self.switch = params.max_positions, params.switch()
        cos, sin = params.cos_sin()
        if self.switch is not None:
            # Two regimes in one table: rows [0, P) for seq_len <= switch, rows [P, 2P) beyond (2P, R/2).
            cos_long, sin_long = params.cos_sin(seq_len=self.switch + 1)
            cos, sin = np.concatenate([cos, cos_long]), np.concatenate([sin, sin_long])
        # float64 -> dtype, rounded once.
        self.register_buffer("cos_table", torch.from_numpy(cos).to(torch_dtype(dtype)))  # (P or 2P, R/2)
        self.register_buffer("sin_table", torch.from_numpy(sin).to(torch_dtype(dtype)))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.switch is not None:
            # As transformers: one regime for the whole call, chosen by max(position_ids) + 1. Positions
            # outside [0, P) go to row 2P, past both tables, so they still fail rather than read a row.
            P = self.max_positions
            long = (position_ids.max() + 1 > self.switch).to(position_ids.dtype)
            bad = (position_ids < 0) | (position_ids >= P)
            position_ids = torch.where(bad, 2 * P, position_ids + long * P)
        return torch.ops.pe_export.rotary_embedding(
            x, self.cos_table, self.sin_table, position_ids, self.interleaved, self.rotary_dim, self.layout
        )


class MRotaryEmbedding(torch.nn.Module):
    """M-RoPE on q or k: `forward(x, position_ids (3, B, S)) -> y`, pairs split among the temporal,
    height and width positions by `params.mrope_section` (a `pe_export.encodings.mrope.MropeParams`).

    The (P, R/2) table is built in float64 and rounded once, then split by columns into one sub-table per
    component (buffers `cos_0`.. `sin_2`, the same floats in all). A call gathers each component's columns
    at that component's positions, concatenates them and puts the pairs back in order with one constant
    index; the per-token rows (B*S, R/2) then feed `pe_export::rotary_embedding` at rows 0 .. B*S - 1, so
    every op target (the fused `onnx` and `ort` ops included) lowers it unchanged.
    """

    def __init__(self, params, layout: str = "bhsd", dtype: str = "fp32"):
        super().__init__()
        check_module_options(layout, dtype)
        self.layout, self.interleaved, self.rotary_dim = layout, params.pairing == "interleaved", params.rotary_dim
        self.max_positions = params.max_positions
        component = params.pair_components()  # (R/2,) 0 temporal, 1 height, 2 width
        cos, sin = params.cos_sin()  # (P, R/2) float64
        self.components = [c for c in range(3) if (component == c).any()]
        for c in self.components:
            # float64 -> dtype, rounded once; a column split, no arithmetic.
            self.register_buffer(f"cos_{c}", torch.from_numpy(cos[:, component == c]).to(torch_dtype(dtype)))
            self.register_buffer(f"sin_{c}", torch.from_numpy(sin[:, component == c]).to(torch_dtype(dtype)))
        grouped = np.concatenate([np.flatnonzero(component == c) for c in self.components])  # pair of each column
        order = np.argsort(grouped)  # column of each pair
        self.reorder = None if (order == np.arange(len(order))).all() else torch.from_numpy(order)  # chunked: None

    def rows(self, position_ids: torch.Tensor, name: str) -> torch.Tensor:
        ids = guard(position_ids, self.max_positions)  # (3, B, S); outside [0, P) -> P: the Gather fails
        parts = [take(getattr(self, f"{name}_{c}"), ids[c]) for c in self.components]  # (B, S, n_c) each
        rows = torch.cat(parts, dim=-1)  # (B, S, R/2), grouped by component
        return rows if self.reorder is None else torch.index_select(rows, -1, self.reorder)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rows(position_ids, "cos"), self.rows(position_ids, "sin")  # (B, S, R/2)
        B, S, half = cos.shape
        tokens = torch.arange(B * S, dtype=position_ids.dtype, device=position_ids.device).reshape(B, S)
        return torch.ops.pe_export.rotary_embedding(
            x,
            cos.reshape(B * S, half),
            sin.reshape(B * S, half),
            tokens,
            self.interleaved,
            self.rotary_dim,
            self.layout,
        )


class ComputedTablesRotary(torch.nn.Module):
    """RoPE whose cos/sin the graph computes in float32 from the positions, as transformers' forward
    does (`inv_freq` (R/2,) is the one constant, rounded once; the accuracy bound is in
    pe_export.encodings.rope). A run-time LongRoPE switch picks its frequency row by
    max(position_ids) + 1 > switch."""

    def __init__(self, params, layout: str = "bhsd", dtype: str = "fp32"):
        super().__init__()
        check_module_options(layout, dtype)
        self.params, self.layout, self.dtype = params, layout, torch_dtype(dtype)
        self.switch = params.switch()
        regimes = [params.frequencies()] + (
            [params.frequencies(seq_len=self.switch + 1)] if self.switch is not None else []
        )
        self.factors = [float(f) for _, f in regimes]
        self.register_buffer(
            "inv_freq", torch.tensor(np.stack([f for f, _ in regimes]), dtype=torch.float32)
        )  # (1 or 2, R/2)
        if len(set(self.factors)) > 1:
            self.register_buffer("attention_factor", torch.tensor(self.factors, dtype=torch.float32))  # (2,)

    def forward(self, x, position_ids):
        p = self.params
        if self.switch is None:
            inv, factor = self.inv_freq[0], self.factors[0]
        else:  # one regime for the whole call, as transformers picks it
            long = (position_ids.max() + 1 > self.switch).to(torch.int64).reshape(1)
            inv = torch.index_select(self.inv_freq, 0, long)[0]
            factor = (
                torch.index_select(self.attention_factor, 0, long) if len(set(self.factors)) > 1 else self.factors[0]
            )
        angles = position_ids.to(torch.float32)[..., None] * inv  # (B, S, R/2), float32 as transformers
        cos, sin = torch.cos(angles), torch.sin(angles)
        if not (isinstance(factor, float) and factor == 1.0):
            cos, sin = cos * factor, sin * factor
        return per_call_rotary(x, cos, sin, position_ids, p, self.layout, self.dtype)


class RuntimeRotary(torch.nn.Module):
    """RoPE whose frequencies the graph computes per call, with the scaling rule's own torch code run
    on the traced `seq_len = max(position_ids) + 1` (dynamic NTK at run time), in float64."""

    def __init__(self, params, layout: str = "bhsd", dtype: str = "fp32"):
        super().__init__()
        check_module_options(layout, dtype)
        self.params, self.layout, self.dtype = params, layout, torch_dtype(dtype)
        self.rule = SCALING_RULES.get(params.scaling)

    def forward(self, x, position_ids):
        p = self.params  # angles "float64": float32 is refused for in-graph rules
        freqs, factor = self.rule(
            theta=p.theta,
            rotary_dim=p.rotary_dim,
            max_positions=p.max_positions,
            dtype=torch.float64,
            seq_len=position_ids.max() + 1,
            **p.scaling_params,
        )
        angles = position_ids.to(torch.float64)[..., None] * freqs  # (B, S, R/2)
        factor = factor * p.attention_factor
        return per_call_rotary(
            x, torch.cos(angles) * factor, torch.sin(angles) * factor, position_ids, p, self.layout, self.dtype
        )


def per_call_rotary(x, cos, sin, position_ids, p, layout, dtype):
    """Apply cos/sin computed for this call, (B, S, R/2), through the same custom op as a table read at
    rows arange(B*S); positions outside [0, P) point past that per-call table, so the call fails."""
    B, S = position_ids.shape
    half = p.rotary_dim // 2
    cos = cos.to(dtype).reshape(B * S, half)  # (B*S, R/2)
    sin = sin.to(dtype).reshape(B * S, half)
    rows = torch.arange(B * S, dtype=torch.int64).reshape(B, S)
    rows = torch.where((position_ids < 0) | (position_ids >= p.max_positions), B * S, rows)
    return torch.ops.pe_export.rotary_embedding(x, cos, sin, rows, p.pairing == "interleaved", p.rotary_dim, layout)
