"""The three ONNX lowerings of `pe_export::rotary_embedding`, one call signature, one registry.

- `onnx`: the standard `RotaryEmbedding` (ai.onnx opset 23), one node for (B, H, S, D). The op
  reads 4D input as heads-before-seq only, so `bshd` is wrapped in two Transposes.
- `ort`: ONNX Runtime's `com.microsoft::RotaryEmbedding`. Its kernels need a static `num_heads`
  whenever `rotary_embedding_dim` is set, so partial rotary is a Slice, a full-width node on the
  rotated part, and a Concat, which keeps heads dynamic; `bshd` is reshaped (no copy) to its 3D form.
- `decomposed`: standard ops only (Gather, Unsqueeze, Reshape, Slice, Concat, Neg, Mul, Add), any
  opset >= 17; see `lower_decomposed` for the arithmetic.
In every lowering negative positions are first mapped to row P (ONNX's Gather and onnx's evaluator
wrap negative indices), so that every runtime that checks indices fails on them.

Each function takes the op's arguments and is called by the exporter with onnxscript tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnxscript
from onnx import defs
from onnxscript import opset17 as op
from onnxscript import opset23 as op23

MSFT = onnxscript.values.Opset("com.microsoft", 1)
BIG = 2**62  # a Slice end past any real axis length


@dataclass(frozen=True)
class OpTarget:
    name: str
    lower: Callable
    min_opset: int
    max_opset: int | None  # None: the newest onnx knows

    def opsets(self) -> range:
        return range(self.min_opset, (self.max_opset or defs.onnx_opset_version()) + 1)


def negatives_past_table(position_ids, cos_table):
    """Negative positions -> P, one past the table, so that no runtime can wrap them (onnx's
    evaluator indexes cos_cache[-1] silently); kernels and Gathers fail on P."""
    return op.Where(op.Less(position_ids, [0]), op.Shape(cos_table, start=0, end=1), position_ids)


def lower_onnx(x, cos_table, sin_table, position_ids, interleaved, rotary_dim, layout):
    position_ids = negatives_past_table(position_ids, cos_table)
    if layout == "bshd":
        x = op.Transpose(x, perm=[0, 2, 1, 3])  # (B, H, S, D)
    y = op23.RotaryEmbedding(
        x, cos_table, sin_table, position_ids, interleaved=int(interleaved), rotary_embedding_dim=rotary_dim
    )
    return op.Transpose(y, perm=[0, 2, 1, 3]) if layout == "bshd" else y


def lower_ort(x, cos_table, sin_table, position_ids, interleaved, rotary_dim, layout):
    register_contrib_schema()
    position_ids = negatives_past_table(position_ids, cos_table)
    rot = x if whole_head(x, rotary_dim) else op.Slice(x, [0], [rotary_dim], [-1])  # (..., R)
    if layout == "bshd":
        rot_shape = op.Shape(rot)
        rot = op.Reshape(rot, [0, 0, -1])  # (B, S, H*R): the kernel reads head size R off the cos table
    y = MSFT.RotaryEmbedding(rot, position_ids, cos_table, sin_table, interleaved=int(interleaved))
    if layout == "bshd":
        y = op.Reshape(y, rot_shape)
    return with_tail(y, x, rotary_dim)


def lower_decomposed(x, cos_table, sin_table, position_ids, interleaved, rotary_dim, layout):
    """y = x * cos + swap(x) * sin, where swap exchanges the two members of each pair and the sign of
    the rotation lives in the sin row (-sin for a pair's first member, +sin for its second).

    x is passed over four times: the swap, two Mul, one Add; no Slice of halves, no Concat of
    results, no Reshape copy into the output. The swap comes first, on x itself: swapping the product
    x * sin instead measured slower in fp16 on ORT CPU, which computes Mul in fp32 and would cast the
    product down for the swap and up again. The cos table is widened to (P, R) before the Gather, by
    copies that ONNX Runtime folds into a constant when the session loads (the file keeps (P, R/2));
    the signed sin rows are built after the Gather, from B*S rows only, because ORT CPU has no fp16 Neg
    kernel: a Neg of the whole table would not fold and would run on every call. Rounding is
    unchanged: each output is still a*c + b*(-s) = a*c - b*s, two rounded products and a rounded sum."""
    rows = op.Shape(cos_table, start=0, end=1)  # (1,) = [P]
    safe_ids = op.Where(op.Less(position_ids, [0]), rows, position_ids)  # negative -> P: out of range
    axis = [1] if layout == "bhsd" else [2]
    half = rotary_dim // 2
    sin = op.Gather(sin_table, safe_ids)  # (B, S, R/2)
    rot = x if whole_head(x, rotary_dim) else op.Slice(x, [0], [rotary_dim], [-1])  # (..., R)
    if interleaved:
        # Pairs (2i, 2i + 1): rows [c0, c0, c1, c1, ...] and [-s0, s0, -s1, s1, ...].
        cos = op.Reshape(
            op.Concat(op.Unsqueeze(cos_table, [-1]), op.Unsqueeze(cos_table, [-1]), axis=-1), [0, rotary_dim]
        )  # (P, R)
        sin = op.Reshape(
            op.Concat(op.Unsqueeze(op.Neg(sin), [-1]), op.Unsqueeze(sin, [-1]), axis=-1), [0, 0, rotary_dim]
        )  # (B, S, R)
        pairs = op.Reshape(rot, [0, 0, 0, half, 2])  # (..., R/2, 2), no copy
        even, odd = op.Slice(pairs, [0], [1], [-1]), op.Slice(pairs, [1], [2], [-1])  # (..., R/2, 1) each
        swapped = op.Reshape(op.Concat(odd, even, axis=-1), [0, 0, 0, rotary_dim])  # (..., R)
    else:
        # Pairs (i, i + R/2): rows [c, c] and [-s, s]; the swap exchanges the halves with one Gather.
        cos = op.Concat(cos_table, cos_table, axis=-1)  # (P, R)
        sin = op.Concat(op.Neg(sin), sin, axis=-1)  # (B, S, R)
        halves = op.Reshape(rot, [0, 0, 0, 2, half])  # (..., 2, R/2), no copy
        swapped = op.Reshape(op.Gather(halves, [1, 0], axis=-2), [0, 0, 0, rotary_dim])  # (..., R)
    cos = op.Unsqueeze(op.Gather(cos, safe_ids), axis)  # (B, 1, S, R) or (B, S, 1, R)
    sin = op.Unsqueeze(sin, axis)
    return with_tail(op.Add(op.Mul(rot, cos), op.Mul(swapped, sin)), x, rotary_dim)


def whole_head(x, rotary_dim: int) -> bool:
    """True when the rotation covers the head (the exporter knows D statically)."""
    return x.shape is not None and x.shape[-1] == rotary_dim


def with_tail(rot, x, rotary_dim: int):
    """Append the unrotated x[..., R:] for partial rotary."""
    if whole_head(x, rotary_dim):
        return rot
    return op.Concat(rot, op.Slice(x, [rotary_dim], [BIG], [-1]), axis=-1)


_contrib_registered = False


def register_contrib_schema() -> None:
    """Give onnx a schema for `com.microsoft::RotaryEmbedding` so the exporter and checker accept it.

    ONNX Runtime defines the op; onnx ships no schema for it. The inputs and attributes follow ORT's
    contrib op documentation (ContribOperators.md, RotaryEmbedding, since version 1).
    """
    global _contrib_registered
    if _contrib_registered or defs.has("RotaryEmbedding", "com.microsoft"):
        _contrib_registered = True
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    INT, FLOAT = defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT
    schema = defs.OpSchema(
        "RotaryEmbedding",
        "com.microsoft",
        1,
        inputs=[P("input", "T"), P("position_ids", "M"), P("cos_cache", "T"), P("sin_cache", "T")],
        outputs=[P("output", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("M", ["tensor(int64)"], ""),
        ],
        attributes=[
            A(name, kind, "", required=False)
            for name, kind in [
                ("interleaved", INT),
                ("rotary_embedding_dim", INT),
                ("num_heads", INT),
                ("scale", FLOAT),
                ("is_packed_batching", INT),
            ]
        ],
    )
    defs.register_schema(schema)
    _contrib_registered = True


OP_TARGETS: dict[str, OpTarget] = {
    t.name: t
    for t in [
        # Upper opsets as measured with torch 2.13: its exporter and onnxscript's version converter stop at 25
        # for graphs with RotaryEmbedding; the decomposed graph converts up to onnx's newest.
        OpTarget("onnx", lower_onnx, 23, 25),
        OpTarget("ort", lower_ort, 18, 25),
        OpTarget("decomposed", lower_decomposed, 17, None),
    ]
}
