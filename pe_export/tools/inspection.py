"""`pe-export inspect`: what an ONNX file holds and which runtimes here can load it.

Works on any ONNX file; a file pe-export wrote also shows its `pe_export.spec` and `pe_export.derived`
metadata, and its runtimes are tried through the same adapters `verify` uses
(`pe_export.runtimes.RUNTIMES`). A file without a spec is tried on ONNX Runtime sessions and onnx's
`ReferenceEvaluator` directly. Every runtime but torch loads in its worker process (pe_export.runtimes.worker),
as in verify: one that aborts or hangs is a CRASH or TIMEOUT row and the others are still reported.
The result is one JSON-ready dict (`inspect_file`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from pe_export.errors import BadInput, one_line
from pe_export.runtimes.graphs import all_nodes
from pe_export.spec import DERIVED_KEY, SPEC_KEY, Spec


def read_model(path: Path) -> tuple[onnx.ModelProto, bytes]:
    """The model (external data not loaded) and the file's bytes, with export.load's errors for a
    missing path, a folder, an empty file and anything onnx cannot parse or check."""
    from pe_export.files import not_onnx, read_file

    data = read_file(path)
    external = []
    try:
        model = onnx.load_from_string(data)
        external = _external(model, path.parent)
        if external:
            onnx.checker.check_model(str(path))  # the path form finds (and checks) the external files
        else:
            onnx.checker.check_model(model)
    except Exception as e:
        missing = [e["location"] for e in external if e["bytes"] is None]
        if missing:
            raise BadInput(f"{str(path)!r} keeps its tables in {missing[0]!r} beside it, which is missing") from None
        raise not_onnx(path, e) from None
    return model, data


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def _domain(domain: str) -> str:
    return domain or "ai.onnx"


def _dtype_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_info(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    shape = None
    if t.HasField("shape"):  # symbolic dims by name, unknown ones as "?"
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": v.name, "dtype": _dtype_name(t.elem_type), "shape": shape}


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        length = {e.key: e.value for e in t.external_data}.get("length")
        if length is not None:
            return int(length)
    elif t.raw_data:
        return len(t.raw_data)
    numel = int(np.prod(t.dims, dtype=np.int64))
    try:
        return numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):  # strings and other types without a fixed width
        return t.ByteSize()


def _external(model: onnx.ModelProto, folder: Path) -> list[dict]:
    files: dict[str, dict] = {}
    for t in external_tensors(model):
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        entry = files.setdefault(location, {"location": location, "tensors": [], "bytes": None})
        entry["tensors"].append(t.name)
        where = folder / location
        entry["bytes"] = where.stat().st_size if where.is_file() else None
    return list(files.values())


def _metadata_json(props: dict, key: str):
    if key not in props:
        return None
    try:
        return json.loads(props[key])
    except json.JSONDecodeError:
        return props[key]  # shown as stored


def _spec(props: dict) -> Spec | None:
    if SPEC_KEY not in props:
        return None
    try:
        return Spec.from_json(props[SPEC_KEY])
    except BadInput:
        return None  # the raw text is still shown; the runtimes are tried without it


def try_load(name: str, adapter, spec: Spec | None, model_bytes: bytes, timeout: float | None = None) -> dict:
    """One runtime row: the adapter loads the model in its worker process (pe_export.runtimes.worker, as in
    verify), so a runtime that aborts or hangs is a CRASH or TIMEOUT row, not the end of inspect."""
    from pe_export.runtimes import worker
    from pe_export.runtimes.outcomes import Skip

    timeout = worker.TIMEOUT_S if timeout is None else timeout
    row = {"runtime": name, "result": "loads", "provider": "", "note": ""}
    try:
        _, row["provider"] = worker.load(name, adapter, spec, model_bytes, timeout)
    except Skip as e:
        row.update(result="skipped", note=one_line(e))
    except worker.Crash as e:
        row.update(result="CRASH", note=one_line(e))
    except worker.Timeout as e:
        row.update(result="TIMEOUT", note=one_line(e))
    except Exception as e:  # any other error: this runtime cannot load the file
        row.update(result="cannot load", note=one_line(e))
    return row


def runtimes_with_spec(spec: Spec, model_bytes: bytes) -> list[dict]:
    """Each of verify's runtimes: loads (and the provider it got), skipped (and why), cannot load, or
    CRASH / TIMEOUT (its process died or hung while loading)."""
    from pe_export.runtimes import RUNTIMES, worker

    worker.start(RUNTIMES, RUNTIMES)  # their interpreters start side by side
    return [try_load(name, adapter, spec, model_bytes) for name, adapter in RUNTIMES.items()]


# Without a spec there is no torch module and no dtype to go by: ONNX Runtime sessions and onnx's
# evaluator load the graph as it is (pe_export.runtimes.GRAPH_RUNTIMES), each still in a worker of its own.
WITHOUT_SPEC = ("ort-cpu", "ort-cpu-noopt", "ort-cuda", "onnx-reference")


def runtimes_without_spec(model: onnx.ModelProto, model_bytes: bytes) -> list[dict]:
    """ONNX Runtime sessions (CPU with and without graph optimisation, CUDA) and onnx's evaluator."""
    from pe_export.runtimes import GRAPH_RUNTIMES, worker

    worker.start(WITHOUT_SPEC, GRAPH_RUNTIMES)
    return [try_load(name, GRAPH_RUNTIMES[name], None, model_bytes) for name in WITHOUT_SPEC]


def inspect_file(path: Path, try_runtimes: bool = True) -> dict:
    """Everything `pe-export inspect` shows, as one JSON-ready dict. Raises BadInput for a path that
    is not a readable ONNX file."""
    model, data = read_model(path)
    props = {p.key: p.value for p in model.metadata_props}
    initializers = [
        {
            "name": t.name,
            "shape": list(t.dims),
            "dtype": _dtype_name(t.data_type),
            "bytes": _tensor_bytes(t),
            "external": t.data_location == onnx.TensorProto.EXTERNAL,
        }
        for t in model.graph.initializer
    ]
    external = _external(model, path.parent)
    ops = Counter(f"{_domain(n.domain)}::{n.op_type}" for n in all_nodes(model.graph))
    doc = {
        "file": str(path),
        "file_bytes": len(data),
        "total_bytes": len(data) + sum(e["bytes"] or 0 for e in external),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset_imports": {_domain(o.domain): o.version for o in model.opset_import},
        "ops": [{"op": op, "count": n} for op, n in sorted(ops.items())],
        "functions": [f"{_domain(f.domain)}::{f.name}" for f in model.functions],
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "initializers": initializers,
        "initializer_bytes": sum(t["bytes"] for t in initializers),
        "external_data": external,
        "spec": _metadata_json(props, SPEC_KEY),
        "derived": _metadata_json(props, DERIVED_KEY),
        "metadata": {k: v for k, v in props.items() if k not in (SPEC_KEY, DERIVED_KEY)},
        "runtimes": [],
    }
    if try_runtimes:
        doc["runtimes"] = _runtimes(path, model, data, _spec(props), bool(external))
    return doc


def _runtimes(path: Path, model: onnx.ModelProto, data: bytes, spec: Spec | None, external: bool) -> list[dict]:
    if external:  # the runtimes take bytes: bring the external tensors in (under protobuf's 2 GiB)
        try:
            model = onnx.load(str(path))
            data = model.SerializeToString()
        except Exception as e:
            note = f"could not load the external data into one model: {one_line(e)}"
            return [{"runtime": "all", "result": "cannot load", "provider": "", "note": note}]
    if spec is not None:
        try:
            from pe_export.pipeline.onnx_export import check_spec

            check_spec(spec)
            return runtimes_with_spec(spec, data)
        except ValueError as e:
            bad = {"runtime": "torch", "result": "cannot load", "provider": "", "note": f"invalid spec: {one_line(e)}"}
            return [bad, *runtimes_without_spec(model, data)]
    return runtimes_without_spec(model, data)
