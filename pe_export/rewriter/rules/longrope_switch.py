"""LongRoPE's run-time switch as graphs hold it, and the If that onnxruntime-genai's model builder writes.

transformers 5.23 (`longrope_frequency_update`) takes the long factors when a call's
`seq_len = max(position_ids) + 1 > original_max_position_embeddings`, else the short ones. A graph holds
the test as `Greater(x, original)` on a constant. onnxruntime-genai 0.18's builder
(`Phi3MiniLongRoPEModel.make_rotary_embedding_multi_cache`, builders/base.py) writes it for CPU, CUDA and
WebGPU as

    attention_mask (B, total) -> Shape -> Gather(1) -> Greater(., original) -> If
        then: Constant cos_cache_large (P, R/2), Constant sin_cache_large       long factors, P rows
        else: Constant cos_cache_small (original, R/2), Constant sin_cache_small short factors
    -> (cos_cache, sin_cache), read by every GroupQueryAttention (or RotaryEmbedding)

`total` is past + current length, so the test is transformers' `seq_len > original` for the positions
0 .. total - 1 genai runs. The replacement keeps the graph's own condition and builds the same If on
float64-built tables (the long ones of --seq rows, the short ones of `original` rows), each branch an
Identity of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

BRANCHES = ("then_branch", "else_branch")  # then: the long factors (x > original), else: the short ones


def switch_threshold(cond: ir.Value) -> int | None:
    """c of cond = Greater(x, c), when c is a constant."""
    node = cond.producer()
    if node is None or node.op_type != "Greater" or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    return int(np.asarray(node.inputs[1].const_value.numpy()).reshape(-1)[0])


def is_total_length(cond: ir.Value) -> bool:
    """cond = Greater(Gather(Shape(m), 1), c) with m a (B, total) graph input: genai's attention mask."""
    x = cond.producer().inputs[0]
    gather = x.producer()
    if gather is None or gather.op_type != "Gather" or gather.inputs[1].const_value is None:
        return False
    if int(np.asarray(gather.inputs[1].const_value.numpy()).reshape(-1)[0]) != 1:
        return False
    shape = gather.inputs[0].producer()
    if shape is None or shape.op_type != "Shape" or shape.attributes.get("start") or shape.attributes.get("end"):
        return False
    mask = shape.inputs[0]
    return mask.is_graph_input() and mask.shape is not None and mask.shape.rank() == 2


def constant(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor a subgraph's value holds: an initializer or a Constant node's `value`."""
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value
    return None


@dataclass
class Switch:
    """An If choosing between two (cos, sin) cache pairs: its condition and, per branch, the pair's
    names and float64 values."""

    node: ir.Node
    cond: ir.Value
    names: dict[str, tuple[str, str]]
    values: dict[str, tuple[np.ndarray, np.ndarray]]
    dtype: str  # the caches' ("fp32", "fp16", "bf16")


def switched(cos_cache: ir.Value, sin_cache: ir.Value, dtypes_of: dict) -> Switch | str | None:
    """The Switch behind caches that are two outputs of one If; a string saying why when they are but
    a branch holds no (P, R/2) constants of `dtypes_of` (ir dtype -> name) or the condition is not
    genai's; None when they are no If's."""
    node = cos_cache.producer()
    if node is None or node.op_type != "If" or sin_cache.producer() is not node:
        return None
    i, j = cos_cache.index(), sin_cache.index()
    names, values, dtypes = {}, {}, set()
    for branch in BRANCHES:
        graph = node.attributes[branch].value
        outs = graph.outputs[i], graph.outputs[j]
        tensors = [constant(v) for v in outs]
        if any(t is None or t.dtype not in dtypes_of or len(t.shape) != 2 for t in tensors):
            return (
                f"the If {node.name!r} choosing the cos/sin caches holds no float32, float16 or bfloat16 (P, R/2) "
                f"constants in its {branch}"
            )
        dtypes.update(dtypes_of[t.dtype] for t in tensors)
        names[branch] = (outs[0].name, outs[1].name)
        values[branch] = tuple(t.numpy().astype(np.float64) for t in tensors)
    if switch_threshold(node.inputs[0]) is None or not is_total_length(node.inputs[0]):
        return f"the If {node.name!r} choosing the cos/sin caches tests no Greater(total sequence length, constant)"
    if len(dtypes) > 1:
        return f"the If {node.name!r} chooses between cos/sin caches of different dtypes {sorted(dtypes)}"
    return Switch(node, node.inputs[0], names, values, dtypes.pop())


def switch_refusal(switch: Switch, original: int) -> str | None:
    """Why the If's threshold is not the config's original length (None when it is)."""
    threshold = switch_threshold(switch.cond)
    if threshold != original:
        return (
            f"original_max_position_embeddings: the graph switches to the long factors above {threshold}, the config "
            f"gives {original}"
        )
    return None


def build_if(op, cond: ir.Value, pairs: dict[str, tuple[ir.Value, ir.Value]], name: str) -> tuple[ir.Value, ir.Value]:
    """If(cond) choosing between the (cos, sin) `pairs` of each branch (outer-scope tables, passed on by
    an Identity): the replacement's cos and sin caches."""
    graphs = {}
    for branch, (cos, sin) in pairs.items():
        nodes = [
            ir.Node("", "Identity", [t], num_outputs=1, name=f"{name}/{branch}/{kind}")
            for kind, t in (("cos", cos), ("sin", sin))
        ]
        for kind, n in zip(("cos", "sin"), nodes):
            n.outputs[0].name = f"{name}/{branch}/{kind}_cache"
        graphs[branch] = ir.Graph([], [n.outputs[0] for n in nodes], nodes=nodes, name=f"{name}/{branch}")
    return op.If(cond, then_branch=graphs["then_branch"], else_branch=graphs["else_branch"], _outputs=2)
