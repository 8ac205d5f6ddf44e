"""LongRoPE's run-time switch as graphs hold it, and the two forms of it onnxruntime-genai's model builder
writes for a fused node's caches.

transformers 5.23 (`longrope_frequency_update`) takes the long factors when a call's
`seq_len = max(position_ids) + 1 > original_max_position_embeddings`, else the short ones. A graph holds
the test as `Greater(x, original)` on a constant. onnxruntime-genai 0.18's builder
(`Phi3MiniLongRoPEModel.make_rotary_embedding_multi_cache`, builders/base.py and phi.py) writes:

- for CPU, CUDA and WebGPU, an If on the total length (past + current, so the test is transformers' for
  the positions 0 .. total - 1 genai runs):

      attention_mask (B, total) -> Shape -> Gather(1) -> Greater(., original) -> If
          then: Constant cos_cache_large (P, R/2), Constant sin_cache_large       long factors, P rows
          else: Constant cos_cache_small (original, R/2), Constant sin_cache_small short factors
      -> (cos_cache, sin_cache), read by every GroupQueryAttention

- for the EPs without If (DML), one concatenated cache, the short rows then the long ones, and positions
  moved into the long rows by the same test:

      cos_cache (original + P, R/2) = [short rows; long rows]
      position_ids + original * Cast(GreaterOrEqual(ReduceMax(position_ids), original))
      -> com.microsoft::RotaryEmbedding(x, those positions, cos_cache, sin_cache)

  (for WebGPU graph capture and TRT-RTX the same cache is read by GroupQueryAttention, the offset being
  an execution-provider option in genai_config.json, not in the graph: not matched.)

Both are replaced by the same form on float64-built tables (long: --seq rows; short: `original` rows),
the graph's own condition or position shift kept: the If's branches an Identity of the tables, the
concatenated cache a Concat of them. Each branch is a site, checked on the positions it serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pe_export.rewriter.job import Site
from pe_export.rewriter.rules.base import site_params

BRANCHES = ("then_branch", "else_branch")  # then: the long factors (x > original), else: the short ones


def _int(value: ir.Value | None) -> int | None:
    t = constant(value) if value is not None else None
    return int(np.asarray(t.numpy()).reshape(-1)[0]) if t is not None and t.size == 1 else None


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def switch_threshold(cond: ir.Value) -> int | None:
    """c of cond = Greater(x, c), when c is a constant."""
    node = _producer(cond, "Greater")
    return _int(node.inputs[1]) if node is not None else None


def is_total_length(cond: ir.Value) -> bool:
    """cond = Greater(Gather(Shape(m), 1), c) with m a (B, total) graph input: genai's attention mask."""
    gather = _producer(cond.producer().inputs[0], "Gather")
    if gather is None or _int(gather.inputs[1]) != 1:
        return False
    shape = _producer(gather.inputs[0], "Shape")
    if shape is None or shape.attributes.get("start") or shape.attributes.get("end"):
        return False
    mask = shape.inputs[0]
    return mask.is_graph_input() and mask.shape is not None and mask.shape.rank() == 2


NOT_SHIFTED = (
    "the cos/sin cache holds short rows then long rows (onnxruntime-genai's LongRoPE for EPs without If), "
    "but its reader's positions are not moved into the long rows by max(position_ids) >= original "
    "(GroupQueryAttention takes that offset from genai_config.json, outside the graph)"
)


def position_shift(positions: ir.Value | None) -> tuple[int | None, int | None] | None:
    """(offset, threshold) of genai's move into the long rows, `p + offset * Cast(GreaterOrEqual(ReduceMax(p),
    threshold))`, with ReduceMax over every axis; None when `positions` is not that form."""
    add = _producer(positions, "Add")
    for mul, p in (add.inputs, add.inputs[::-1]) if add is not None else ():
        node = _producer(mul, "Mul")
        casts = [v for v in node.inputs if _producer(v, "Cast")] if node is not None else []
        if len(casts) != 1:
            continue
        offset = node.inputs[1] if node.inputs[0] is casts[0] else node.inputs[0]
        test = _producer(_producer(casts[0], "Cast").inputs[0], "GreaterOrEqual")
        top = _producer(test.inputs[0], "ReduceMax") if test is not None else None
        if top is not None and top.inputs[0] is p and not top.attributes.get("axes") and len(top.inputs) == 1:
            return _int(offset), _int(test.inputs[1])
    return None


def constant(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor a (sub)graph's value holds: an initializer or a Constant node's `value`."""
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value
    return None


@dataclass
class Switch:
    """LongRoPE's long and short cache pairs of a fused node: per branch, the original's (cos, sin) names,
    float64 values and first row in them; the If choosing them (None: one concatenated cache)."""

    node: ir.Node | None
    cond: ir.Value | None
    names: dict[str, tuple[str, str]]
    values: dict[str, tuple[np.ndarray, np.ndarray]]
    dtype: str  # the caches' ("fp32", "fp16", "bf16")
    offsets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BRANCHES, 0))


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


def concatenated(names: tuple[str, str], cos: np.ndarray, sin: np.ndarray, original: int, dtype: str) -> Switch:
    """The branches of one (original + P, R/2) cache pair: short rows first, then long ones."""
    return Switch(
        None,
        None,
        dict.fromkeys(BRANCHES, names),
        {"then_branch": (cos[original:], sin[original:]), "else_branch": (cos[:original], sin[:original])},
        dtype,
        {"then_branch": original, "else_branch": 0},
    )


def switch_refusal(switch: Switch, original: int) -> str | None:
    """Why the If's threshold is not the config's original length (None when it is)."""
    threshold = switch_threshold(switch.cond) if switch.cond is not None else original
    if threshold != original:
        return (
            f"original_max_position_embeddings: the graph switches to the long factors above {threshold}, the config "
            f"gives {original}"
        )
    return None


def branch_sites(rule, op, switch: Switch, p, positions: str) -> tuple[dict, list[Site]]:
    """Per branch, the float64-built (cos, sin) tables (long: --seq rows; short: the `original` positions
    it serves) and the branch's site (recorded in the rule's job)."""
    job, original = rule.job, p.scaling_params["original_max_positions"]
    pairs, sites = {}, []
    for branch, seq_len, label in zip(BRANCHES, (original + 1, original), ("_long", "_short")):
        rows = None if seq_len > original else min(original, job.table_params(p).max_positions)
        pairs[branch] = job.tables_for(op, p, seq_len, label, rows, switch.dtype)
        cos_name, sin_name = switch.names[branch]
        site = Site(
            rule=rule.rule_name,
            inv_freq=cos_name,
            positions=positions,
            cos=cos_name,
            sin=sin_name,
            params=site_params(job.table_params(p)),
            tables=[t.name for t in pairs[branch]],
            seq_len=seq_len,
            width="table",
            fused=rule.fused,
            replaced=[sin_name],
            dtype=switch.dtype,
            offset=switch.offsets[branch],
        )
        job.site_index[(cos_name, sin_name, seq_len)] = site
        job.sites.append(site)
        sites.append(site)
    return pairs, sites


def rebuild(op, switch: Switch, pairs: dict, name: str) -> tuple[ir.Value, ir.Value]:
    """The replacement's cos and sin caches: the If on the graph's condition over the new tables (each
    branch an Identity of them), or the concatenated [short; long] tables."""
    if switch.node is None:
        short, long = pairs["else_branch"], pairs["then_branch"]
        return op.Concat(short[0], long[0], axis=0), op.Concat(short[1], long[1], axis=0)
    graphs = {}
    for branch, (cos, sin) in pairs.items():
        nodes = [
            ir.Node("", "Identity", [t], num_outputs=1, name=f"{name}/{branch}/{kind}")
            for kind, t in (("cos", cos), ("sin", sin))
        ]
        for kind, n in zip(("cos", "sin"), nodes):
            n.outputs[0].name = f"{name}/{branch}/{kind}_cache"
        graphs[branch] = ir.Graph([], [n.outputs[0] for n in nodes], nodes=nodes, name=f"{name}/{branch}")
    return op.If(switch.cond, then_branch=graphs["then_branch"], else_branch=graphs["else_branch"], _outputs=2)
