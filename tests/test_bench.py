"""`pe-export bench`: structure of the result, numbers finite and positive, shapes from each graph
contract, and the bad-input contract (exit 2). No timed assertions: timings depend on the machine."""

import json
import math
from dataclasses import replace

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
    from pe_export.encodings import ENCODINGS
    from pe_export.presets import PRESETS
    from pe_export.tools.bench import bench, make_inputs

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


def test_bound_call_writes_what_a_plain_run_returns():
    """The preallocated, bound output holds the session's own answer (fp32, fp16, and bf16 as bits),
    read back here independently of bench's binding."""
    import ctypes

    from pe_export.dtypes import numpy_dtype
    from pe_export.presets import PRESETS
    from pe_export.runtimes.ort import _ort_call
    from pe_export.tools.bench import bound_call, make_inputs, session

    for dtype, itemsize in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        spec = Spec(encoding="t5-bias", params=dict(PRESETS["t5-bias"].params), op="decomposed", opset=17, dtype=dtype)
        sess = session(exported(spec), "cpu", 1)
        inputs = make_inputs(spec, "prefill", 24, 1, 1)
        call, nbytes, out = bound_call(sess, inputs, "cpu")
        call()
        shape = tuple(out.shape())
        assert shape == (1, 12, 24, 24) and nbytes == 12 * 24 * 24 * itemsize
        raw = (ctypes.c_uint8 * nbytes).from_address(out.data_ptr())
        got = np.frombuffer(raw, dtype=numpy_dtype(dtype)).reshape(shape).astype(np.float64)
        np.testing.assert_array_equal(got, _ort_call(sess, spec)(inputs))


def test_inputs_placed_on_a_device_keep_their_bits():
    """on_device (the CUDA path's host-to-device copy), run with CPU memory: every dtype bench feeds."""
    import ctypes

    from pe_export.dtypes import numpy_dtype
    from pe_export.runtimes.ort import host_value
    from pe_export.tools.bench import on_device

    for dtype in ("fp32", "fp16", "bf16", "int64"):
        a = (np.arange(24).reshape(2, 12) - 7.5).astype(numpy_dtype(dtype) if dtype != "int64" else np.int64)
        host = host_value(a)
        value = on_device(host, "cpu")
        assert value.shape() == [2, 12] and value.element_type() == host.element_type()
        got = np.frombuffer((ctypes.c_uint8 * a.nbytes).from_address(value.data_ptr()), dtype=a.dtype)
        assert np.array_equal(got.reshape(a.shape), a)


def test_device_copy_graph_copies():
    """The memcpy used on CUDA (an ORT Identity between bound buffers), run here on the CPU: it loads
    (IR version), binds a uint8 output, and copies every byte."""
    from pe_export.tools.bench import bound_call, copy_model, session

    data = (np.arange(1000) % 251).astype(np.uint8)
    call, nbytes, out = bound_call(session(copy_model(1000), "cpu", 1), {"a": data}, "cpu")
    out.update_inplace(np.zeros(1000, np.uint8))
    call()
    assert nbytes == 1000 and np.array_equal(out.numpy(), data)


def test_cpu_memcpy_is_ort_copying_with_the_graphs_threads():
    """The CPU yardstick is ORT running a graph that really copies x into y, with the same intra-op
    threads as the graph (so 1.0 is the speed of memory at those threads), not a one-thread NumPy copy."""
    from pe_export.tools.bench import bound_call, copy_graph, memcpy_call, session

    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    x[:3] = [np.inf, -0.0, 1e-45]  # a copy keeps every value, the signed zero and a subnormal included
    sess = session(copy_graph(1000), "cpu", 2, optimize=False)
    call, nbytes, out = bound_call(sess, {"x": x}, "cpu")
    call()
    assert nbytes == 4000 and np.array_equal(out.numpy().view(np.uint32), x.view(np.uint32))
    for threads in (1, 3):
        call, how = memcpy_call(8000, "cpu", threads)
        call()
        assert f"intra_op_num_threads={threads}" in how and "NumPy" not in how


def test_profile_splits_the_prefill_by_op(tmp_path):
    """--profile: the decomposed graph's time is spread over its own op types (after ORT's
    optimisations), the shares with the time outside kernels sum to 1, largest first."""
    path = write(tmp_path, rope_spec(op="decomposed", max_positions=64))
    result = runner.invoke(app, ["bench", str(path), "--heads", "2", "--repeat", "3", "--profile", "--json"])
    assert result.exit_code == 0, result.output
    shares = json.loads(result.output)["time_by_op"]["cpu"]
    ops = [op for op, _ in shares]
    assert ops[-1] == "outside kernels" and {"Mul", "Add", "Gather"} <= set(ops[:-1])
    assert all(0 <= share <= 1 for _, share in shares) and sum(share for _, share in shares) == pytest.approx(1)
    assert [share for _, share in shares[:-1]] == sorted((share for _, share in shares[:-1]), reverse=True)
    result = runner.invoke(app, ["bench", str(path), "--repeat", "3", "--profile"])
    assert (
        result.exit_code == 0 and "where the prefill's time goes on cpu" in result.output and "Gather" in result.output
    )
    result = runner.invoke(app, ["bench", str(path), "--providers", "cuda", "--profile"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_static_shapes_file(tmp_path):
    """A static-shapes file is timed at its own shapes: a prefill, or a decode when S is 1; other sizes exit 2."""
    spec = replace(rope_spec(op="decomposed", max_positions=64), static_shapes=[2, 16, 3])
    path = write(tmp_path, spec)
    result = runner.invoke(app, ["bench", str(path), "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    (case,) = json.loads(result.output)["cases"]
    assert case["name"] == "prefill" and case["shapes"] == {"x": [2, 3, 16, 64], "position_ids": [2, 16]}
    for args in (["--seq", "8"], ["--batch", "1"], ["--heads", "4"]):
        result = runner.invoke(app, ["bench", str(path), *args])
        assert result.exit_code == 2 and "does not fit this file's static shapes 2,16,3" in result.output, result.output
    spec = replace(spec, static_shapes=[1, 1, 2])
    result = runner.invoke(app, ["bench", str(write(tmp_path, spec, "d.onnx")), "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    (case,) = json.loads(result.output)["cases"]
    assert case["name"] == "decode" and case["shapes"] == {"x": [1, 2, 1, 64], "position_ids": [1, 1]}


@pytest.mark.parametrize(
    "encoding, params, gathered_dim",
    [
        ("xpos", dict(head_dim=16, scale_base=512.0, role="key", max_positions=64), 16),
        ("randomized-rope", dict(head_dim=8, pairing="interleaved", train_length=40, max_positions=64), 8),
        ("rope", dict(head_dim=32, rotary_dim=16, max_positions=64), 16),
        ("rope", dict(head_dim=32, max_positions=64, tables="computed"), 0),
    ],
)
def test_every_rotary_encoding(encoding, params, gathered_dim):
    """Each rotary encoding's own parameters give the byte model's gathered rows (R of the table; none
    for a graph that computes cos/sin)."""
    from pe_export.encodings import ENCODINGS
    from pe_export.tools.bench import bench

    op = ENCODINGS.get(encoding).ops[0]
    spec = Spec(encoding=encoding, params=params, op=op, opset=23 if op == "onnx" else 17)
    result = bench(spec, exported(spec), seq=16, heads=2, repeat=3)
    prefill = result.cases[0]
    D = params["head_dim"]
    io = 2 * (2 * 16 * D * 4) + 16 * 8  # x in and y out (fp32), position ids
    assert prefill.bytes == io + 2 * 16 * (gathered_dim // 2) * 4


@pytest.mark.parametrize(
    "args, make, message",
    [
        (["--repeat", "3"], lambda p: None, "does not exist"),
        (["--repeat", "3"], lambda p: p.write_bytes(b"not onnx"), "not a valid ONNX model"),
        (["--providers", "tpu"], "good", "--providers takes"),
        (["--seq", "65"], "good", "--seq must be in [1, 64]"),
        (["--threads", "0"], "good", "--threads must be >= 1"),
        (["--batch", "1000000000"], "good", "--batch must be in [1, "),
        (["--heads", "1000000000"], "good", "--heads must be in [1, "),
        (["--runtimes", "tpu"], "good", "--runtimes takes a comma-separated list of tract, ort-web"),
        (["--runtimes", ""], "good", "--runtimes takes a comma-separated list of tract, ort-web"),
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
    assert len(result.output.strip().splitlines()) == 1


def test_file_without_spec_exits_2(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )
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
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="CUDAExecutionProvider not available",
)
def test_cuda_runs_on_cuda(tmp_path):
    path = write(tmp_path, rope_spec(op="ort", max_positions=64, dtype="fp16"))
    result = runner.invoke(app, ["bench", str(path), "--providers", "cuda", "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    cases = json.loads(result.output)["cases"]
    assert {c["provider"] for c in cases} == {"CUDAExecutionProvider"}
    assert all(math.isfinite(c["ratio"]) and c["ratio"] > 0 for c in cases)


@pytest.mark.parametrize("runtime", __import__("pe_export.tools.bench", fromlist=["BENCH_RUNTIMES"]).BENCH_RUNTIMES)
def test_other_runtimes_are_timed_against_the_same_runs_ort_memcpy(tmp_path, runtime):
    from pe_export.runtimes import RUNTIMES, Skip

    spec = rope_spec(op="decomposed", max_positions=64)
    try:
        RUNTIMES[runtime](spec, exported(spec))
    except Skip as e:
        pytest.skip(str(e))
    path = write(tmp_path, spec)
    result = runner.invoke(app, ["bench", str(path), "--heads", "2", "--repeat", "3", "--runtimes", runtime, "--json"])
    assert result.exit_code == 0, result.output
    cases = json.loads(result.output)["cases"]
    assert [(c["runtime"], c["name"]) for c in cases] == [
        ("ort", "prefill"),
        ("ort", "decode"),
        (runtime, "prefill"),
        (runtime, "decode"),
    ]
    ort_prefill, _, prefill, decode = cases
    assert prefill["bytes"] == ort_prefill["bytes"] and prefill["shapes"] == ort_prefill["shapes"]
    for c in (prefill, decode):
        assert c["provider"] != "CPUExecutionProvider" and "intra_op_num_threads=2" in c["note"]
        for key in ("op_s", "memcpy_s", "ratio", "p50_ms"):
            assert math.isfinite(c[key]) and c[key] > 0, (key, c[key])
        assert c["ratio"] == pytest.approx(c["memcpy_s"] / c["op_s"])
