"""M-RoPE text sites under --op onnx|ort|decomposed: the per-token cos/sin rows the q/k rotations read.

A text export of Qwen2-VL, Qwen2.5-VL or Qwen3-VL (transformers 5.23) computes Cos/Sin of (3, B, S, R/2)
angles, which `rules.cos_sin_mul_half` replaces by a Gather of the float64-built (P, R/2) tables at the
three position rows (temporal, height, width). The graph then selects, for each rotary pair j, the column
of the row of its component: contiguous sections (Qwen2-VL's `recomposition_frequencies`: Split, Gather,
Concat) or Qwen3-VL's interleaved ones (Slice, ScatterND, ScatterElements), then Concat(f, f) (B, S, R)
for `rotate_half`.

That selection is read off the graph, not off the config: the nodes between the site's Gather and f are
run by onnx's reference evaluator on a probe whose every entry holds its own index. They must return, for
every token, entry (c(j), token, k(j)) for pair j, one (c, k) per pair: a selection, no arithmetic, so each
row entry is a table entry. The rotation then reads those rows through one constant Gather:

    cos3 (3, B, S, R/2) -> (3, B*S, R/2) -> Transpose (B*S, 3, R/2) -> (B*S, 3R/2)
    -> Gather(c(j) * R/2 + k(j), axis 1) -> (B*S, R/2), read at positions arange(B*S) reshaped (B, S)

the form every rotation lowering takes unchanged (as `pe_export.encodings.mrope` exports M-RoPE): the
opset-23 RotaryEmbedding and the decomposed form would also take (B, S, R/2) rows, but
com.microsoft::RotaryEmbedding refuses 3-D caches (ORT 1.32, docs/mrope.md).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pe_export.errors import one_line
from pe_export.rewriter.emit import ints

MAX_NODES = 256  # the selection chain's size limit: Qwen3-VL's interleaved chain is 34 nodes per cos or sin
PROBE_B, PROBE_S = 2, 3


def site_rows(f: ir.Value | None) -> dict | str | None:
    """For f of Concat(f, f) (B, S, R) behind an M-RoPE site's rotation: {"table": (T,), "positions":
    safe (3, B, S), "cond": None, "root": the site's (3, B, S, R/2) Gather, "select": (R/2,) c * R/2 + k};
    a str: the reason f is not a selection of the site's rows; None: no site Gather lies behind f."""
    if f is None:
        return None
    chain = selection_chain(f)
    if chain is None or isinstance(chain, str):
        return chain
    root, nodes, constants = chain
    table, positions = root.producer().inputs[0], root.producer().inputs[1]
    select = probe(f, root, nodes, constants, table.const_value.shape[-1])
    if isinstance(select, str):
        return select
    return {"table": (table,), "positions": positions, "cond": None, "root": root, "select": select}


def is_site_gather(node: ir.Node) -> bool:
    """A half-width site's replacement: Gather(pe_export.rope.* table, positions (3, B, S))."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return False
    table, positions = node.inputs[0], node.inputs[1]
    if table is None or table.const_value is None or not (table.name or "").startswith("pe_export.rope."):
        return False
    shape = positions.shape if positions is not None else None
    if shape is None or shape.rank() is None:
        return True
    return shape.rank() == 3 and (not isinstance(shape[0], int) or shape[0] == 3)


def selection_chain(f: ir.Value):
    """(root, nodes in graph order, constant values) between one site Gather (the root) and f; None when
    no site Gather lies behind f (within MAX_NODES nodes); else the reason f also reads something else."""
    nodes, constants, roots, other, seen, stack = [], [], [], [], set(), [f]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if v.const_value is not None:
            constants.append(v)
        elif node is None:
            other.append(f"the graph input {v.name!r}")
        elif is_site_gather(node):
            roots.append(v)
        elif node.domain not in ("", "ai.onnx"):
            other.append(f"{node.domain}::{node.op_type}")
        elif node not in nodes:  # a Split's outputs share their node
            nodes.append(node)
            if len(nodes) > MAX_NODES:
                return None
            stack.extend(node.inputs)
    if not roots:
        return None
    if other or len(roots) > 1:
        return f"the section selection after the site reads {', '.join(other) or f'{len(roots)} sites'}"
    order = {n: i for i, n in enumerate(nodes[0].graph)} if nodes else {}
    return roots[0], sorted(nodes, key=order.__getitem__), constants


def probe(f: ir.Value, root: ir.Value, nodes, constants, half: int) -> np.ndarray | str:
    """(R/2,) c * R/2 + k: the component c and column k each pair of f reads, found by running the chain
    on a (3, B, S, R/2) probe whose entries are their own flat indices; or why it is not a selection."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx_ir import serde

    initializers = []
    for v in constants:
        t = serde.serialize_tensor(v.const_value)
        t.name = v.name
        initializers.append(t)
    graph = onnx.helper.make_graph(
        [serde.serialize_node(n) for n in nodes],
        "mrope_selection",
        [onnx.helper.make_tensor_value_info(root.name, onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info(f.name, onnx.TensorProto.FLOAT, None)],
        initializers,
    )
    opsets = nodes[0].graph.opset_imports if nodes else {"": 18}
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    B, S = PROBE_B, PROBE_S
    ids = np.arange(3 * B * S * half, dtype=np.float32).reshape(3, B, S, half)  # exact in float32
    try:
        (out,) = ReferenceEvaluator(model).run(None, {root.name: ids})
    except Exception as e:  # the chain is not one the probe can run: not recognised
        return f"the section selection could not be run on a probe ({type(e).__name__}: {one_line(e, 120)})"
    out = np.asarray(out)
    if out.shape != (B, S, half) or not np.array_equal(out, np.round(out)) or out.min() < 0 or out.max() >= ids.size:
        return f"the section selection is not a selection of the (3, B, S, {half}) rows (got {out.shape})"
    flat = out.astype(np.int64)
    c, b, s, k = flat // (B * S * half), (flat // (S * half)) % B, (flat // half) % S, flat % half
    same = (c == c[:1, :1]).all() and (k == k[:1, :1]).all()
    if not same or not (b == np.arange(B)[:, None, None]).all() or not (s == np.arange(S)[None, :, None]).all():
        return "the section selection mixes tokens or differs between tokens"
    return (c[0, 0] * half + k[0, 0]).astype(np.int64)


def rows(op, found: dict) -> ir.Value:
    """(B*S, R/2) per-token rows of the site's (3, B, S, R/2) Gather `found["root"]`."""
    select = found["select"]
    half = found["table"][0].const_value.shape[-1]
    flat = op.Reshape(found["root"], ints(op, [3, -1, half]))  # (3, B*S, R/2)
    per_token = op.Reshape(op.Transpose(flat, perm=[1, 0, 2]), ints(op, [-1, 3 * half]))  # (B*S, 3R/2)
    return op.Gather(per_token, ints(op, select), axis=1)  # (B*S, R/2)


def token_positions(op, positions: ir.Value) -> ir.Value:
    """(B, S) int64 arange(B*S): the row of each token in `rows`, from the site's positions (3, B, S)."""
    shape = op.Shape(positions, start=1, end=3)  # (2,) = [B, S]
    count = op.ReduceProd(shape, keepdims=0)  # () = B*S
    return op.Reshape(op.Range(ints(op, 0), count, ints(op, 1)), shape)  # (B, S)
