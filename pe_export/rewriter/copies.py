"""The copies of a model the checks give the runtimes: the graph with extra outputs (or pruned to them),
as bytes for a small model, or for a large one (weights over `files.EXTERNAL_DATA_THRESHOLD`, or kept as
external data) as a file in a temporary folder that reads the model's own external data file. Runtimes
load such a copy by path (ONNX Runtime, OpenVINO and onnx's reference evaluator read external data from
the model's folder), so no protobuf of all weights is ever built: a model over 2 GiB cannot be one.

The external data files are hard-linked into the copies' folder, created beside them: ONNX Runtime
(1.32) refuses external data a symlink or a `..` leads out of the model's folder ("External data path
escapes model directory"), and a hard link is the same file, made in no time, without copying a byte.
Where no hard link can be made (a read-only folder, another file system) the folder is a system
temporary one with symbolic links: OpenVINO and onnx's evaluator follow them, ORT's row then says why
it could not load. Weights held in memory (the rewrite's new tables) go to the copy's own side file.

    with Copies(original, rewritten) as copies:
        copy = copies.with_outputs(rewritten, ["cos", "sin"], only=True)  # .model: bytes or a path
        both = copies.joined(original, rewritten, ["cos", "sin"], only=True)  # the two in one graph (pair.py)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import onnx_ir as ir

from pe_export import files
from pe_export.runtimes.outcomes import Unsupported

MAX_PROTO = 2**31 - 2**20  # what one protobuf holds, less room for the graph


class Copy(NamedTuple):
    model: bytes | str  # the copy's bytes, or the path of its file
    outputs: list[str]  # its outputs' names, in order
    inputs: list[str]  # its inputs' names: a pruned copy reads only some (runtimes refuse unknown feeds)


class Pair(NamedTuple):
    """A copy of the original and the rewritten model as one graph (`pair.joined`)."""

    model: bytes | str
    outputs: list[str]
    inputs: list[str]
    original: list[str]  # the outputs that are the original's values
    rewritten: list[str]  # the outputs that are the rewritten's values
    names: list[str]  # their names in the rewritten model


def external_files(model: ir.Model) -> dict[str, Path]:
    """{location: file} of every external data file the model's initializers read."""
    out = {}
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            out[str(t.location)] = Path(t.base_dir) / t.location
    return out


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def is_large(model: ir.Model) -> bool:
    """Checked through files (by path) and one runtime at a time: weights over the one threshold, or
    weights kept as external data."""
    return bool(external_files(model)) or weight_bytes(model) > files.EXTERNAL_DATA_THRESHOLD


def outputs_added(model: ir.Model, names: list[str], only: bool = False):
    """(an onnx.ModelProto copy of `model` with the named values as outputs, the names of its outputs in
    order): the model's own outputs and then the named ones (names it does not compute are left out),
    or with `only` just the named ones, the graph pruned to what computes them and its inputs to those
    they read (OpenVINO drops an unread input, then refuses a feed for it). External tensors stay
    references to their files (onnx_ir serializes them as they are); `model` is unchanged."""
    proto = ir.to_proto(model)
    computed = {v for node in proto.graph.node for v in node.output} | {i.name for i in proto.graph.input}
    wanted = [n for n in dict.fromkeys(names) if n in computed]
    if only:
        return ir.to_proto(pruned(ir.from_proto(proto), wanted)), wanted
    have = [o.name for o in proto.graph.output]
    for name in wanted:
        if name not in have:
            proto.graph.output.add().name = name
            have.append(name)
    return proto, have


def pruned(copy: ir.Model, names: list[str]) -> ir.Model:
    """`copy` (changed in place) with the named values as its only outputs and only the nodes that
    compute them and the inputs they read."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    values = {v.name: v for node in copy.graph for v in node.outputs} | {v.name: v for v in copy.graph.inputs}
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(values[n] for n in names)
    RemoveUnusedNodesPass()(copy)
    for v in [v for v in copy.graph.inputs if not v.uses()]:
        copy.graph.inputs.remove(v)
    return copy


def as_bytes(model: ir.Model, names: list[str], only: bool = False) -> Copy:
    """The copy as bytes, its external data read into it (a runtime given bytes has no folder to find it
    in); `Unsupported` when its weights are over what one protobuf holds."""
    proto, have = outputs_added(model, names, only)
    found = external_files(model)
    if found:
        if weight_bytes(model) > MAX_PROTO:
            raise Unsupported("not run: its weights exceed the 2 GiB a model held in memory can have")
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(next(iter(found.values())).parent))
    return Copy(proto.SerializeToString(), have, [i.name for i in proto.graph.input])


class Copies:
    """A temporary folder for the copies of large models, removed on exit; `with_outputs` gives bytes
    for a small model and a path for a large one (`is_large`)."""

    def __init__(self, *models: ir.Model):
        self.models, self.folder, self.count = models, None, 0
        self.weighted: set[str] = set()  # the copies (paths) that read the models' external data

    def __enter__(self) -> Copies:
        return self

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _open(self) -> Path:
        """The folder, made on first use: beside the external data with hard links to it, else a system
        temporary folder with symbolic links."""
        if self.folder is not None:
            return self.folder
        found = {}
        for m in self.models:
            found.update(external_files(m))
        beside = next(iter(found.values())).parent if found else None
        with contextlib.suppress(OSError):
            if beside is not None:
                self.folder = Path(tempfile.mkdtemp(prefix=".pe-export-checks-", dir=beside))
                self._link(found, os.link)
                return self.folder
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = Path(tempfile.mkdtemp(prefix="pe-export-checks-"))
        self._link(found, lambda src, dst: os.symlink(os.path.abspath(src), dst))
        return self.folder

    def _link(self, found: dict[str, Path], link) -> None:
        for location, path in found.items():
            target = self.folder / location
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                link(path, target)

    def with_outputs(self, model: ir.Model, names: list[str], only: bool = False) -> Copy:
        """The `outputs_added` copy: bytes for a small model, a file for a large one."""
        if not is_large(model):
            return as_bytes(model, names, only)
        proto, have = outputs_added(model, names, only)
        return Copy(self._file(proto), have, [i.name for i in proto.graph.input])

    def joined(self, original: ir.Model, rewritten: ir.Model, names: list[str], only: bool = False) -> Pair | None:
        """The two models as one graph (`pair.joined`), bytes or a file as `with_outputs`; None when one
        graph cannot hold both."""
        from pe_export.rewriter.pair import joined

        both = joined(original, rewritten, names, only)
        if both is None:
            return None
        outputs = list(dict.fromkeys([*both.original, *both.rewritten]))
        proto = ir.to_proto(pruned(ir.from_proto(both.proto), outputs)) if only else both.proto
        model = self._file(proto) if is_large(original) or is_large(rewritten) else proto.SerializeToString()
        return Pair(model, outputs, [i.name for i in proto.graph.input], both.original, both.rewritten, both.names)

    def holds_weights(self, model: bytes | str) -> bool:
        """Whether a copy given by path reads the models' external data (a worker that loaded it holds
        their weights; a copy pruned to the cos/sin computation reads none)."""
        return isinstance(model, str) and model in self.weighted

    def _file(self, proto) -> str:
        """`proto` written into the folder; tensors held in memory (>= 1 KiB) go to the copy's own side
        file, external ones stay references to the models' files (hard-linked beside it)."""
        import onnx

        self.count += 1
        path = self._open() / f"check-{self.count}.onnx"
        reads = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        onnx.save_model(proto, path, save_as_external_data=True, location=f"{path.name}.side", size_threshold=1024)
        if reads:
            self.weighted.add(str(path))
        return str(path)
