"""`pe-export bench`: structure of the result, numbers finite and positive, shapes from each graph
contract, and the bad-input contract (exit 2). No timed assertions: timings depend on the machine."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.spec import Spec
from tests.conftest import exported, rope_spec

pytest.importorskip("onnxruntime")
runner = CliRunner()


def write(tmp_path, spec, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(exported(spec))
    return path


def test_bench_json_structure(tmp_path):
    path = write(tmp_path, rope_spec(op="decomposed", max_positions=64))
    result = runner.invoke(app, ["bench", str(path), "--heads", "2", "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["spec"]["op"] == "decomposed" and doc["threads"] == 2 and doc["seq"] == 64
    assert [c["name"] for c in doc["cases"]] == ["prefill", "decode"]
    prefill, decode = doc["cases"]
    assert prefill["shapes"] == {"x": [1, 2, 64, 64], "position_ids": [1, 64]}
    assert decode["shapes"] == {"x": [1, 2, 1, 64], "position_ids": [1, 1]}
    # Byte model: x in, y out (fp32), position ids (int64), cos and sin rows of R/2 = 32 fp32 each.
    assert prefill["bytes"] == 2 * (2 * 64 * 64 * 4) + 64 * 8 + 2 * 64 * 32 * 4
    for c in doc["cases"]:
        assert c["provider"] == "CPUExecutionProvider"
        assert decode["repeat"] >= 200
        for key in ("op_s", "memcpy_s", "gbps", "memcpy_gbps", "ratio", "p50_ms", "p90_ms", "p99_ms"):
            assert math.isfinite(c[key]) and c[key] > 0, (key, c[key])
        assert c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"]
        assert c["ratio"] == pytest.approx(c["memcpy_s"] / c["op_s"])
        assert c["gbps"] == pytest.approx(c["bytes"] / c["op_s"] / 1e9)


def test_bench_table_output(tmp_path):
    path = write(tmp_path, rope_spec(op="ort", layout="bshd", max_positions=32))
    result = runner.invoke(app, ["bench", str(path), "--heads", "3", "--repeat", "3", "--seq", "16"])
    assert result.exit_code == 0, result.output
    assert "prefill" in result.output and "decode" in result.output and "1x16x3x64" in result.output


@pytest.mark.parametrize(
    "preset, kind",
    [("bloom-alibi", "bias"), ("vaswani-sinusoidal", "absolute")],
)
def test_other_contracts(preset, kind):
    """Bias: Q = K = S, decode Q = 1 over K = S; absolute: (B, S) and (B, 1); positions end at P - 1."""
    from pe_export.bench import bench, make_inputs
    from pe_export.encodings import ENCODINGS
    from pe_export.presets import PRESETS

    enc = ENCODINGS.get(PRESETS[preset].encoding)
    assert enc.kind == kind
    spec = Spec(encoding=enc.name, params={**PRESETS[preset].params, "max_positions": 48}, op="decomposed", opset=17)
    prefill, decode = make_inputs(spec, "prefill", 40, 1, 32), make_inputs(spec, "decode", 40, 1, 32)
    for inputs in (prefill, decode):
        for v in inputs.values():
            assert v.max() == 47 and np.all(np.diff(v, axis=-1) == 1)
    if kind == "bias":
        assert prefill["query_positions"].shape == prefill["key_positions"].shape == (40,)
        assert decode["query_positions"].shape == (1,) and decode["key_positions"].shape == (40,)
    else:
        assert prefill["position_ids"].shape == (1, 40) and decode["position_ids"].shape == (1, 1)
    result = bench(spec, exported(spec), seq=40, repeat=3)
    assert [c.name for c in result.cases] == ["prefill", "decode"]
    assert all(c.op_s > 0 and math.isfinite(c.ratio) for c in result.cases)


@pytest.mark.parametrize(
    "args, make, message",
    [
        (["--repeat", "3"], lambda p: None, "does not exist"),
        (["--repeat", "3"], lambda p: p.write_bytes(b"not onnx"), "not a valid ONNX model"),
        (["--providers", "tpu"], "good", "--providers takes"),
        (["--seq", "65"], "good", "--seq must be in [1, 64]"),
        (["--threads", "0"], "good", "--threads must be >= 1"),
    ],
)
def test_bad_input_exits_2(tmp_path, args, make, message):
    path = tmp_path / "m.onnx"
    if make == "good":
        path = write(tmp_path, rope_spec(op="decomposed", max_positions=64))
    else:
        make(path)
    result = runner.invoke(app, ["bench", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_file_without_spec_exits_2(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), path)
    result = runner.invoke(app, ["bench", str(path)])
    assert result.exit_code == 2 and "no pe_export.spec metadata" in result.output


def test_cuda_unavailable_exits_2(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is available here")
    path = write(tmp_path, rope_spec(op="decomposed", max_positions=64))
    result = runner.invoke(app, ["bench", str(path), "--providers", "cuda"])
    assert result.exit_code == 2 and "CUDAExecutionProvider is not available" in result.output


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(), reason="CUDAExecutionProvider not available"
)
def test_cuda_runs_on_cuda(tmp_path):
    path = write(tmp_path, rope_spec(op="ort", max_positions=64, dtype="fp16"))
    result = runner.invoke(app, ["bench", str(path), "--providers", "cuda", "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    cases = json.loads(result.output)["cases"]
    assert {c["provider"] for c in cases} == {"CUDAExecutionProvider"}
    assert all(math.isfinite(c["ratio"]) and c["ratio"] > 0 for c in cases)
