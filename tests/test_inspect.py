"""`pe-export inspect`: ops, opsets, inputs and outputs, initializers, external data, the spec and the
runtimes that load a file, for files pe-export wrote and for any other ONNX file; bad paths and corrupt
files are one-line errors with exit code 2."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import exported, rope_spec
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.spec import Spec

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output  # stdout and stderr together


def inspect_json(path) -> dict:
    result, text = invoke("inspect", path, "--json")
    assert result.exit_code == 0, text
    return json.loads(text)


def gather_model(name="table", domain_op=None) -> onnx.ModelProto:
    """A model pe-export did not write: y = table[ids] with a (64, 64) float32 table, optionally
    followed by an op of a custom domain no runtime knows."""
    table = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), name)
    nodes = [helper.make_node("Gather", [name, "ids"], ["g"], axis=0)]
    opsets = [helper.make_opsetid("", 17)]
    if domain_op:
        nodes.append(helper.make_node(domain_op, ["g"], ["y"], domain="my.domain"))
        opsets.append(helper.make_opsetid("my.domain", 1))
    else:
        nodes.append(helper.make_node("Identity", ["g"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", 64])],
        [table],
    )
    return helper.make_model(graph, opset_imports=opsets)


def test_pe_export_file(tmp_path):
    spec = rope_spec(max_positions=64)
    path = tmp_path / "rope.onnx"
    path.write_bytes(exported(spec))
    doc = inspect_json(path)
    model = onnx.load(str(path))
    counted = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node)
    assert {o["op"]: o["count"] for o in doc["ops"]} == dict(counted)
    assert doc["ops"] and "ai.onnx::RotaryEmbedding" in counted
    assert doc["opset_imports"] == {"ai.onnx": 23}
    assert doc["inputs"] == [
        {"name": "x", "dtype": "float", "shape": ["batch", "heads", "seq", 64]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
    ]
    assert doc["outputs"] == [{"name": "y", "dtype": "float", "shape": ["batch", "heads", "seq", 64]}]
    tables = {t["name"]: t for t in doc["initializers"]}
    # head_dim 64 -> R/2 = 32 frequencies, 64 rows, float32: 64 * 32 * 4 bytes each.
    assert tables["cos_table"]["shape"] == [64, 32] and tables["cos_table"]["bytes"] == 8192
    assert tables["sin_table"]["dtype"] == "float" and tables["sin_table"]["bytes"] == 8192
    assert doc["initializer_bytes"] == sum(t["bytes"] for t in doc["initializers"])
    assert doc["file_bytes"] == doc["total_bytes"] == path.stat().st_size
    assert doc["external_data"] == []
    assert Spec(**doc["spec"]) == spec
    assert doc["derived"] == {"attention_factor": 1.0}
    runtimes = {r["runtime"]: r for r in doc["runtimes"]}
    from pe_export.runtimes import RUNTIMES

    assert list(runtimes) == list(RUNTIMES)
    assert runtimes["ort-cpu"]["result"] == "loads" and runtimes["ort-cpu"]["provider"] == "CPUExecutionProvider"
    assert runtimes["onnx-reference"]["result"] == "loads" and runtimes["torch"]["result"] == "loads"
    assert runtimes["ort-cuda"]["result"] in ("loads", "skipped")


def test_tables_output(tmp_path):
    path = tmp_path / "rope.onnx"
    path.write_bytes(exported(rope_spec(max_positions=64)))
    result, text = invoke("inspect", path)
    assert result.exit_code == 0, text
    for words in (
        "ai.onnx::RotaryEmbedding",
        "cos_table",
        "(64, 32)",
        "(batch, heads, seq, 64)",
        "pe_export.spec",
        '"max_positions": 64',
        "pe_export.derived",
        "CPUExecutionProvider",
        "loads",
    ):
        assert words in text, (words, text)


def test_ort_contrib_file_is_not_for_the_reference_evaluator(tmp_path):
    path = tmp_path / "ort.onnx"
    path.write_bytes(exported(rope_spec(op="ort", max_positions=64)))
    doc = inspect_json(path)
    assert "com.microsoft::RotaryEmbedding" in {o["op"] for o in doc["ops"]}
    assert doc["opset_imports"]["com.microsoft"] == 1
    runtimes = {r["runtime"]: r for r in doc["runtimes"]}
    assert runtimes["onnx-reference"]["result"] == "skipped" and "com.microsoft" in runtimes["onnx-reference"]["note"]
    assert runtimes["ort-cpu"]["result"] == "loads"


def test_any_onnx_file_with_external_data(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(gather_model(), str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    doc = inspect_json(folder / "m.onnx")
    assert doc["spec"] is None and doc["derived"] is None
    assert doc["initializers"] == [
        {"name": "table", "shape": [64, 64], "dtype": "float", "bytes": 16384, "external": True}
    ]
    assert doc["external_data"] == [{"location": "m.data", "tensors": ["table"], "bytes": 16384}]
    assert doc["total_bytes"] == (folder / "m.onnx").stat().st_size + 16384
    assert doc["ops"] == [{"op": "ai.onnx::Gather", "count": 1}, {"op": "ai.onnx::Identity", "count": 1}]
    assert doc["inputs"] == [{"name": "ids", "dtype": "int64", "shape": ["s"]}]
    runtimes = {r["runtime"]: r for r in doc["runtimes"]}
    assert "torch" not in runtimes  # no spec, no torch module
    assert runtimes["ort-cpu"]["result"] == runtimes["onnx-reference"]["result"] == "loads"
    result, text = invoke("inspect", folder / "m.onnx")
    assert result.exit_code == 0 and "not written by pe-export" in text and "m.data" in text


def test_a_file_no_runtime_loads(tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save(gather_model(domain_op="Frobnicate"), str(path))
    doc = inspect_json(path)
    assert {"op": "my.domain::Frobnicate", "count": 1} in doc["ops"]
    runtimes = {r["runtime"]: r for r in doc["runtimes"]}
    assert runtimes["ort-cpu"]["result"] == "cannot load" and "Frobnicate" in runtimes["ort-cpu"]["note"]
    assert runtimes["onnx-reference"]["result"] == "skipped"


@pytest.mark.parametrize("written_by_pe_export", [True, False])
def test_a_runtime_that_aborts_is_a_crash_row_and_the_others_are_reported(tmp_path, monkeypatch, written_by_pe_export):
    """Each runtime loads in its worker process (issue 15): one that aborts takes only its own row down."""
    import fake_runtimes

    from pe_export.runtimes import GRAPH_RUNTIMES, RUNTIMES
    from pe_export.tools import inspection

    if written_by_pe_export:
        monkeypatch.setitem(RUNTIMES, "aborts-on-load", fake_runtimes.aborts_on_load)
        table = list(RUNTIMES)
    else:  # a file without a spec: its runtimes are graph adapters
        monkeypatch.setitem(GRAPH_RUNTIMES, "aborts-on-load", fake_runtimes.aborts_on_load_graph)
        monkeypatch.setattr(inspection, "WITHOUT_SPEC", (*inspection.WITHOUT_SPEC, "aborts-on-load"))
        table = list(inspection.WITHOUT_SPEC)
    path = tmp_path / "m.onnx"
    if written_by_pe_export:
        path.write_bytes(exported(rope_spec(max_positions=64)))
    else:
        onnx.save(gather_model(), str(path))
    doc = inspect_json(path)
    runtimes = {r["runtime"]: r for r in doc["runtimes"]}
    assert list(runtimes) == list(table)
    crash = runtimes["aborts-on-load"]
    assert crash["result"] == "CRASH" and "killed by SIGABRT" in crash["note"], crash
    assert runtimes["ort-cpu"]["result"] == runtimes["onnx-reference"]["result"] == "loads"
    assert runtimes["ort-cpu"]["provider"] == "CPUExecutionProvider"


def test_missing_external_data_is_an_error(tmp_path):
    onnx.save(gather_model(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    result, text = invoke("inspect", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "keeps its tables in 'm.data' beside it, which is missing" in text, text
    assert len(text.strip().splitlines()) == 1, text


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "garbage", "truncated"])
def test_bad_paths_are_one_line_exit_2(case, tmp_path):
    path = tmp_path / "m.onnx"
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"this is not a protobuf \xff\xfe")
    elif case == "truncated":
        data = exported(rope_spec(max_positions=64))
        path.write_bytes(data[: len(data) // 2])
    words = {"missing": "does not exist", "folder": "is not a file", "empty": "is empty"}.get(
        case, "is not a valid ONNX model"
    )
    for args in (["inspect", path], ["inspect", path, "--json"]):
        result, text = invoke(*args)
        assert result.exit_code == 2, text
        assert words in text and len(text.strip().splitlines()) == 1, text
