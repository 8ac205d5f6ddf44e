"""What a graph holds nearest to a RoPE site, for the one-line "no RoPE site found" error, so that a user
can report the shape no rule matches: "a Cos reads a float32 MatMul of a Constant (1, 64, 1) and
Unsqueeze(input 'position_ids') through 2 Casts"; or a fused RoPE node and what its cos cache comes from.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

# Ops that move or convert the angles without computing them: walked through, and counted.
THROUGH = {"Cast", "Concat", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Slice", "Split"}
FUSED = {"RotaryEmbedding": 3, "GroupQueryAttention": 7}  # op -> the input index of its cos cache (contrib order)


def operand(v: ir.Value | None, depth: int = 3) -> str:
    """ "a Constant (1, 64, 1)", "input 'position_ids'", or "Cast(Unsqueeze(input 'position_ids'))"."""
    if v is None:
        return "nothing"
    if v.const_value is not None:
        return f"a Constant {tuple(v.const_value.shape)}"
    node = v.producer()
    if node is None:
        return f"input {v.name!r}"
    if depth == 0 or not node.inputs:
        return f"{node.op_type}(...)"
    return f"{node.op_type}({operand(node.inputs[0], depth - 1)})"


def through(v: ir.Value) -> tuple[ir.Value, Counter]:
    """The value behind THROUGH ops, and how many of each were passed."""
    passed = Counter()
    while (node := v.producer()) is not None and node.op_type in THROUGH and node.inputs and node.inputs[0] is not None:
        passed[node.op_type] += 1
        v = node.inputs[0]
    return v, passed


def counted(passed: Counter) -> str:
    if not passed:
        return ""
    return " through " + ", ".join(f"{n} {op}{'s' if n > 1 else ''}" for op, n in passed.items())


def describe(v: ir.Value) -> str:
    source, passed = through(v)
    node = source.producer()
    typed = [source, *(node.inputs if node is not None else ())]
    dtype = next((str(t.dtype.numpy()) for t in typed if t is not None and t.dtype is not None), "untyped")
    if node is None:
        what = f"a Constant {tuple(source.const_value.shape)}" if source.const_value is not None else operand(source)
        return f"{what}{counted(passed)}"
    operands = " and ".join(operand(i) for i in node.inputs)
    return f"a {dtype} {node.op_type} of {operands}{counted(passed)}"


def nearest(model: ir.Model) -> str:
    """One clause naming what the graph holds nearest to a site, or that it holds no Cos, Sin or fused node."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in ("Cos", "Sin") and node.inputs[0] is not None:
            return f"a {node.op_type} reads {describe(node.inputs[0])}; no rule matches"
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        index = FUSED.get(node.op_type)
        if index is not None and len(node.inputs) > index and node.inputs[index] is not None:
            return f"a {node.op_type} reads its cos cache from {describe(node.inputs[index])}; no rule matches"
    return "the graph holds no Cos, Sin, RotaryEmbedding or GroupQueryAttention"
