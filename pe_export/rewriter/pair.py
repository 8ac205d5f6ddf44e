"""The original and the rewritten model as one graph, so that a runtime loads and runs the two at once:
one session per runtime instead of two, the weights read (and a runtime's work on them, such as ONNX
Runtime folding the transpose of a tied embedding) once. Measured in docs/large-models.md.

The rewritten graph is a clone of the original in which the RoPE sites changed and every value kept
its name. A node of the rewritten graph whose operator, attributes, inputs and outputs are those of
the original's node of the same outputs computes the same value from the same values: the joined graph
has it once. Every other node of the rewritten graph (a site, and everything it feeds) is added beside
the original's, its outputs renamed with `SUFFIX`; an initializer is shared when it is the same tensor
(the same bytes, or the same place in the same external data file), else added renamed. No node is
changed: each model's outputs come from its own nodes, as when each runs alone.

    joined(original, rewritten, ["cos", "sin"], only=True)
        -> Joined(proto, original=["cos", "sin"], rewritten=["cos__rewritten", "sin__rewritten"], names=["cos", "sin"])
        or None when one graph cannot hold both (control flow, opsets or functions that differ)

`copies.Copies.joined` prunes it to its outputs and gives it to the runtimes as bytes or a file.
"""

from __future__ import annotations

from typing import NamedTuple

import onnx
import onnx_ir as ir

SUFFIX = "__rewritten"


class Joined(NamedTuple):
    proto: onnx.ModelProto
    original: list[str]  # the joined graph's outputs that are the original's values, in order
    rewritten: list[str]  # those that are the rewritten's (a value both compute alike keeps its name)
    names: list[str]  # the names `rewritten`'s values have in the rewritten model


def joined(original: ir.Model, rewritten: ir.Model, names: list[str], only: bool = False) -> Joined | None:
    """Both models in one graph, with each one's outputs and then the named values it computes (with
    `only`, just the named values: the graph's outputs are those alone, for `copies.pruned`); `original`
    and `rewritten` are unchanged. None when one graph cannot hold both."""
    po, pn = ir.to_proto(original), ir.to_proto(rewritten)
    if not _compatible(po, pn):
        return None
    graph = po.graph
    taken = {v for n in graph.node for v in n.output} | {t.name for t in graph.initializer}
    taken |= {i.name for i in graph.input}
    renamed: dict[str, str] = {}

    def rename(name: str) -> str:
        new = name + SUFFIX
        while new in taken:
            new += "_"
        taken.add(new)
        renamed[name] = new
        return new

    weights = {t.name: t for t in graph.initializer}
    for t in pn.graph.initializer:
        if t.name in weights and _same_tensor(weights[t.name], t):
            continue
        graph.initializer.add().CopyFrom(t)
        graph.initializer[-1].name = rename(t.name)
    inputs = {i.name for i in graph.input}
    for i in pn.graph.input:
        if i.name not in inputs:
            if i.name in taken:  # an input of one that the other computes: no feed could name both
                return None
            graph.input.add().CopyFrom(i)
    producer = {v: n for n in graph.node for v in n.output}
    for node in pn.graph.node:
        reads = [renamed.get(v, v) for v in node.input]
        twin = producer.get(node.output[0]) if node.output else None
        if twin is not None and _same_node(twin, node, reads):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None  # its body may read renamed values by their old names
        added = graph.node.add()
        added.CopyFrom(node)
        del added.input[:], added.output[:]
        added.input.extend(reads)
        added.output.extend(rename(v) if v else v for v in node.output)
        added.name = node.name + SUFFIX if node.name else ""
    outputs_o, outputs_n = _asked(po, names, only), _asked(pn, names, only)
    ours = [renamed.get(v, v) for v in outputs_n]
    if only:
        del graph.output[:]
    have = [o.name for o in graph.output]
    typed = {o.name: o for o in pn.graph.output}  # the rewritten's own outputs keep their types
    for name, own in zip([*outputs_o, *ours], [*outputs_o, *outputs_n]):
        if name not in have:
            added = graph.output.add()
            if own in typed:
                added.CopyFrom(typed[own])
            added.name = name
            have.append(name)
    return Joined(po, outputs_o, ours, outputs_n)


def _asked(proto: onnx.ModelProto, names: list[str], only: bool) -> list[str]:
    """The model's outputs and the named values it computes (with `only`: just those), in order."""
    computed = {v for n in proto.graph.node for v in n.output} | {i.name for i in proto.graph.input}
    wanted = [n for n in dict.fromkeys(names) if n in computed]
    if only:
        return wanted
    own = [o.name for o in proto.graph.output]
    return own + [n for n in wanted if n not in own]


def _compatible(po: onnx.ModelProto, pn: onnx.ModelProto) -> bool:
    """The same version of each operator domain both import, and the same function under each name."""
    opsets = {o.domain: o.version for o in po.opset_import}
    for o in pn.opset_import:
        if o.domain not in opsets:
            po.opset_import.add().CopyFrom(o)
            opsets[o.domain] = o.version
        elif opsets[o.domain] != o.version:
            return False
    functions = {(f.domain, f.name, f.overload): f for f in po.functions}
    for f in pn.functions:
        key = (f.domain, f.name, f.overload)
        if key not in functions:
            po.functions.add().CopyFrom(f)
        elif functions[key].SerializeToString() != f.SerializeToString():
            return False
    return True


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    """The same tensor under the same name: its type, shape and bytes, or its place in external data."""
    fields = lambda t: (t.data_type, list(t.dims), t.data_location, [(e.key, e.value) for e in t.external_data])  # noqa: E731
    if fields(a) != fields(b):
        return False
    x, y = onnx.TensorProto(), onnx.TensorProto()
    x.CopyFrom(a)
    y.CopyFrom(b)
    x.name = y.name = ""
    return x.SerializeToString() == y.SerializeToString()


def _same_node(a: onnx.NodeProto, b: onnx.NodeProto, reads: list[str]) -> bool:
    """`b`, reading `reads`, computes what `a` computes: the same operator and attributes on the same values."""
    return (
        (a.domain, a.op_type, a.overload) == (b.domain, b.op_type, b.overload)
        and list(a.input) == reads
        and list(a.output) == list(b.output)
        and [x.SerializeToString() for x in a.attribute] == [x.SerializeToString() for x in b.attribute]
    )
