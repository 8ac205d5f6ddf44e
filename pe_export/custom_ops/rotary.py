"""`pe_export::rotary_embedding`: RoPE on x with cos/sin tables gathered by position_ids.

One opaque op through `torch.export`, so that each ONNX target (see `lowerings.py`) can lower it to
the node or nodes it wants. The eager kernel is the PyTorch original the exports are verified against;
the fake kernel gives shapes for tracing. It trains: the gradient with respect to x is the inverse
rotation, which is the same op with the sin table negated (the tables are constants: no gradient).

    x            (B, H, S, D) if layout == "bhsd", (B, S, H, D) if layout == "bshd"
    cos_table    (P, R/2), sin_table the same, attention factor already included
    position_ids (B, S) int64, each in [0, P)
    -> y         same shape and dtype as x
"""

import torch

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.custom_ops.rotation import apply_torch, heads_axis
from pe_export.errors import BadInput


@torch.library.custom_op("pe_export::rotary_embedding", mutates_args=())
def rotary_embedding(
    x: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    position_ids: torch.Tensor,
    interleaved: bool,
    rotary_dim: int,
    layout: str,
) -> torch.Tensor:
    # Torch indexing wraps negative positions; the exported graphs refuse them, so does the original.
    rows = cos_table.shape[0]
    if position_ids.numel() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= rows):
        bad = position_ids[(position_ids < 0) | (position_ids >= rows)][0]
        raise IndexError(f"position_ids value {int(bad)} is out of range [0, {rows})")
    axis = heads_axis(layout)
    cos = cos_table[position_ids].unsqueeze(axis)  # (B, 1, S, R/2) or (B, S, 1, R/2)
    sin = sin_table[position_ids].unsqueeze(axis)
    return apply_torch(x, cos, sin, interleaved=interleaved, rotary_dim=rotary_dim)


@rotary_embedding.register_fake
def _(x, cos_table, sin_table, position_ids, interleaved, rotary_dim, layout):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, cos_table, sin_table, position_ids, interleaved, rotary_dim, layout = inputs
    ctx.save_for_backward(cos_table, sin_table, position_ids)
    ctx.options = (interleaved, rotary_dim, layout)


def _backward(ctx, grad):
    # Each pair's rotation [[c, -s], [s, c]] is orthogonal: its transpose, the rotation by -angle, maps
    # dL/dy to dL/dx; the pass-through tail's gradient passes through too.
    cos_table, sin_table, position_ids = ctx.saved_tensors
    dx = rotary_embedding(grad, cos_table, -sin_table, position_ids, *ctx.options)
    return dx, None, None, None, None, None, None


rotary_embedding.register_autograd(_backward, setup_context=_setup_context)


def translation_table(op: str = "onnx") -> dict:
    """The `custom_translation_table` that lowers every `pe_export.RotaryEmbedding` of a model in
    `torch.onnx.export(model, args, dynamo=True, custom_translation_table=..., opset_version=23)`:
    `onnx` (the standard RotaryEmbedding, opset 23+), `ort` (com.microsoft::RotaryEmbedding, ONNX
    Runtime only) or `decomposed` (plain ops, any runtime)."""
    if op not in OP_TARGETS:
        raise BadInput(f"op must be one of {', '.join(OP_TARGETS)}, got {op!r}")
    return {rotary_embedding._opoverload: OP_TARGETS[op].lower}
