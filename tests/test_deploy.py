"""Deployment options (pe_export.encodings.static_shapes, op_choice, packaging, computed tables in
encodings.rope): computed RoPE tables, static shapes, --op auto, the .ort format, ORT's optimised graph
and external data; each recorded in the spec and verified."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from conftest import exported, rope_spec
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.custom_ops import op_choice
from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.encodings import ENCODINGS, KINDS, rope, static_shapes
from pe_export.encodings.rope import RopeParams, inv_freq
from pe_export.pipeline.onnx_export import load
from pe_export.presets import PRESETS
from pe_export.spec import Spec

runner = CliRunner()
LLAMA = {k: v for k, v in PRESETS["llama-rope"].params.items()}  # theta 5e5, head_dim 128


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_verified(spec):
    """Nothing fails; torch, ORT CPU and onnx's evaluator pass (the evaluator skips com.microsoft ops)."""
    from pe_export.verification.parity import check, verdict

    rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=("torch", "ort-cpu", "onnx-reference"))}
    assert not [r for r in rows.values() if r.verdict == "FAIL"], rows
    assert rows["torch"].verdict == rows["ort-cpu"].verdict == "pass" and rows["ort-cpu"].worst_ratio <= 1
    assert rows["onnx-reference"].verdict == ("skipped" if spec.op == "ort" else "pass")
    assert verdict(list(rows.values())) == "pass"


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pe-export: error:"), result.output
    for w in words:
        assert w in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------
# Computed tables


@pytest.mark.parametrize("op", list(OP_TARGETS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_computed_tables_verify_and_store_no_table(op, dtype):
    spec = rope_spec(
        op,
        dtype,
        max_positions=300,
        tables="computed",
        scaling="yarn",
        scaling_params={"factor": 4.0, "original_max_positions": 64},
    )
    assert_verified(spec)
    import onnx

    model = onnx.load_from_string(exported(spec))
    ops = {n.op_type for n in model.graph.node}
    assert {"Cos", "Sin"} <= ops
    stored = sum(np.prod(t.dims) for t in model.graph.initializer)
    assert stored <= 64, stored  # inv_freq (R/2,) and scalars: no (P, R/2) table
    props = {m.key: m.value for m in model.metadata_props}
    assert json.loads(props["pe_export.spec"])["params"]["tables"] == "computed"


def test_computed_tables_float32_angles_and_longrope_switch():
    assert_verified(rope_spec("onnx", max_positions=300, tables="computed", angles="float32"))
    longrope = {"short_factor": [1.0] * 32, "long_factor": [2.0] * 32, "original_max_positions": 128, "factor": 2.0}
    assert_verified(
        rope_spec("decomposed", max_positions=300, tables="computed", scaling="longrope", scaling_params=longrope)
    )


def test_computed_tables_bound_catches_a_wrong_frequency():
    """inv_freq moved by 2^-19 relative (8x the derived angle term) fails verification."""
    import onnx

    from pe_export.verification.parity import check

    spec = rope_spec("decomposed", max_positions=300, tables="computed")
    model = onnx.load_from_string(exported(spec))
    (t,) = [t for t in model.graph.initializer if np.prod(t.dims) == 32]
    values = onnx.numpy_helper.to_array(t).astype(np.float32) * np.float32(1 + 2.0**-19)
    t.CopyFrom(onnx.numpy_helper.from_array(values, t.name))
    rows = check(spec, model.SerializeToString(), ("ort-cpu",))
    assert rows[0].verdict == "FAIL" and rows[0].worst_ratio > 2, rows[0]


def test_computed_tables_accuracy_cost_at_large_positions():
    """Measured cost of float32 angles (Llama 3, theta 5e5, R = 128, ORT CPU): about 1e-4 at position
    8191 and 2e-3 at 131071 against float64, always within the derived term 2^-23 p inv_freq + 2^-22."""
    import onnxruntime as ort

    spec = Spec(encoding="rope", params=dict(LLAMA, max_positions=131072, tables="computed"), op="decomposed", opset=17)
    sess = ort.InferenceSession(exported(spec), providers=["CPUExecutionProvider"])
    freqs, _ = inv_freq(RopeParams(**spec.params))
    x = np.zeros((1, 1, 1, 128), np.float32)
    x[..., :64] = 1  # pairs (1, 0): y = (cos, sin)
    for pos, low, high in ((8191, 3e-5, 3e-4), (131071, 5e-4, 5e-3)):
        y = sess.run(None, {"x": x, "position_ids": np.array([[pos]])})[0].astype(np.float64)
        theta = pos * freqs
        err = np.maximum(np.abs(y[0, 0, 0, :64] - np.cos(theta)), np.abs(y[0, 0, 0, 64:] - np.sin(theta)))
        assert low < err.max() < high, (pos, err.max())
        assert np.all(err <= rope.ANGLE_ULP * theta + rope.COS_SIN_ERROR), pos


def test_computed_tables_refusals_and_old_specs():
    dynamic = {"factor": 2.0, "original_max_positions": 128, "mode": "runtime"}
    with pytest.raises(ValueError, match="tables 'computed' does not apply"):
        RopeParams(head_dim=64, max_positions=256, scaling="dynamic", scaling_params=dynamic, tables="computed")
    with pytest.raises(ValueError, match="tables must be one of constant, computed"):
        RopeParams(head_dim=64, tables="cached")
    one_line_error(invoke("llama-rope", "--seq", 64, "--attention", "--tables", "computed"), "--attention")
    # A spec written before these options existed still loads, with their defaults.
    old = {
        "encoding": "rope",
        "params": {"head_dim": 64, "max_positions": 16},
        "op": "onnx",
        "opset": 23,
        "dtype": "fp32",
        "layout": "bhsd",
        "version": "0.1.0",
    }
    spec = Spec.from_json(json.dumps(old))
    assert spec.static_shapes is None and spec.deploy == {} and RopeParams(**spec.params).tables == "constant"


# ------------------------------------------------------------------------------------------------
# Static shapes, one case per contract, generated from the registries


def static_case(kind):
    """(spec, static shape) for the first preset of each contract kind, shrunk to 64 positions."""
    shapes = {"rotary": [2, 16, 3], "absolute": [2, 16], "bias": [1, 16], "attention": [2, 16]}
    if kind not in shapes:
        pytest.skip(f"the {kind} contract has no --static-shapes yet (tests/test_mrope.py checks the refusal)")
    for preset in PRESETS.values():
        enc = ENCODINGS.get(preset.encoding)
        if enc.kind == kind:
            params = {**preset.params, "max_positions": 64}
            if "dim" in params:
                params["dim"] = 32
            return Spec(
                encoding=preset.encoding,
                params=params,
                op=enc.ops[-1],
                opset=OP_TARGETS[enc.ops[-1]].min_opset,
                static_shapes=shapes[kind],
            )
    pytest.skip(f"no preset of kind {kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_static_shapes_no_symbolic_dims_and_probes_fit(kind):
    import onnx

    from pe_export.encodings.probing import make_probes

    spec = static_case(kind)
    model = onnx.load_from_string(exported(spec))
    assert static_shapes.symbolic_dims(model) == []
    sizes = static_shapes.static_sizes(spec)
    names = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    probes = make_probes(spec, seed=1, batch=2)
    seen = set()
    for name, inputs in probes:
        for k, v in inputs.items():
            assert list(v.shape) == names[k], (name, k, v.shape, names[k])
            if k in ("position_ids", "key_positions"):
                seen |= set(np.asarray(v).ravel().tolist())
    assert 63 in seen  # the last table row is still read
    if kind in ("rotary", "absolute"):
        assert seen == set(range(64))  # and every row, cut into windows of S
    assert sizes["seq"] == 16
    assert_verified(spec)


@pytest.mark.parametrize("op", list(OP_TARGETS))
def test_static_shapes_rotary_every_target_bshd(op):
    spec = dataclasses.replace(
        rope_spec(op, layout="bshd", max_positions=100, tables="computed"), static_shapes=[1, 100, 2]
    )
    assert_verified(spec)


@pytest.mark.parametrize(
    "preset, shape, words",
    [
        ("llama-rope", "1,64", ["B,S,H"]),
        ("llama-rope", "1,65,2", ["S must be <= the table length --seq 64"]),
        ("llama-rope", "0,8,2", [">= 1"]),
        ("llama-rope", "1,x", ["comma-separated integers"]),
        ("bloom-alibi", "2,8", ["bias", "1,S"]),
    ],
)
def test_static_shapes_bad_input(tmp_path, preset, shape, words):
    out = tmp_path / "m.onnx"
    one_line_error(invoke(preset, "--seq", 64, "--static-shapes", shape, "-o", out), *words)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# --op auto


def test_pick_op_follows_the_opset_ranges():
    rope = ENCODINGS.get("rope").ops
    newest = OP_TARGETS["decomposed"].opsets().stop - 1
    assert op_choice.pick_op(rope, None, False)[0] == "onnx"
    assert op_choice.pick_op(rope, 23, False)[0] == "onnx"
    assert op_choice.pick_op(rope, 18, True)[0] == "ort"  # ORT below opset 23: its contrib op
    assert op_choice.pick_op(rope, 18, False)[0] == "decomposed"
    assert op_choice.pick_op(rope, 17, True)[0] == "decomposed"  # below the contrib op's range
    assert op_choice.pick_op(rope, newest, False)[0] == (
        "decomposed" if newest > OP_TARGETS["onnx"].max_opset else "onnx"
    )
    past = OP_TARGETS["onnx"].max_opset + 1
    assert op_choice.pick_op(rope, past, True) == (
        "decomposed",
        f"plain ops (torch's exporter writes the fused ops up to opset {past - 1})",
    )
    assert op_choice.pick_op(ENCODINGS.get("alibi").ops, 23, True)[0] == "decomposed"


def test_op_auto_cli_records_the_pick(tmp_path):
    out = tmp_path / "a.onnx"
    result = invoke(
        "llama-rope", "--seq", 64, "--head-dim", 32, "--op", "auto", "--opset", 18, "--format", "ort", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "--op auto picked ort (opset 18)" in result.output
    _, spec = load(out)
    assert (spec.op, spec.opset, spec.deploy) == ("ort", 18, {"format": "ort"})
    assert (tmp_path / "a.ort").exists() and "verified: " + str(tmp_path / "a.ort") in result.output.replace("\n", "")


def test_decomposed_newest_opset_computed_tables():
    newest = OP_TARGETS["decomposed"].opsets().stop - 1
    spec = dataclasses.replace(rope_spec("decomposed", max_positions=200, tables="computed"), opset=newest)
    assert_verified(spec)


# ------------------------------------------------------------------------------------------------
# .ort format and ORT's optimised graph


def test_ort_format_written_and_loadable(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    result = invoke(
        "llama-rope", "--seq", 64, "--head-dim", 32, "--format", "ort", "--static-shapes", "1,8,2", "-o", out
    )
    assert result.exit_code == 0, result.output
    data = (tmp_path / "m.ort").read_bytes()
    assert data[4:8] == b"ORTM"  # the flatbuffer identifier of ORT's format
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [[1, 2, 8, 32], [1, 8]]
    assert json.loads(sess.get_modelmeta().custom_metadata_map["pe_export.spec"])["deploy"] == {"format": "ort"}


def test_ort_format_without_the_tool_writes_nothing(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "convert_onnx_models_to_ort" in name else real(name, *a)
    )
    one_line_error(invoke("llama-rope", "--seq", 64, "--format", "ort", "-o", tmp_path / "m.onnx"), "conversion tool")
    assert not list(tmp_path.iterdir())


def test_optimize_writes_a_verified_graph(tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("gpt-neox-rope", "--seq", 64, "--head-dim", 32, "--optimize", "extended", "-o", out)
    assert result.exit_code == 0, result.output
    optimized = tmp_path / "m.opt-extended-cpu.onnx"
    assert optimized.exists() and "verified: " + str(optimized) in result.output.replace("\n", "")
    model, spec = load(optimized)
    assert spec.deploy == {"optimize": "extended"}
    # ORT's file imports its own domains whatever it kept; the nodes decide whether onnx's evaluator runs.
    assert {o.domain for o in model.opset_import} > {"", "com.microsoft"}
    from pe_export.verification.parity import check

    (row,) = check(spec, optimized.read_bytes(), ("onnx-reference",))
    assert {n.domain for n in model.graph.node} == {""} and row.verdict == "pass", row
    # Without --force nothing is overwritten, the optimised graph included.
    out.unlink()
    one_line_error(
        invoke("gpt-neox-rope", "--seq", 64, "--head-dim", 32, "--optimize", "extended", "-o", out), "--force"
    )
    assert not out.exists()


@pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(), reason="a CUDA provider is present"
)
def test_optimize_for_cuda_without_cuda_is_bad_input(tmp_path):
    one_line_error(
        invoke(
            "llama-rope", "--seq", 64, "--optimize", "all", "--optimize-provider", "cuda", "-o", tmp_path / "m.onnx"
        ),
        "cuda",
    )
    one_line_error(
        invoke("llama-rope", "--seq", 64, "--optimize-provider", "cpu", "-o", tmp_path / "m.onnx"), "--optimize LEVEL"
    )
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# External data


def test_external_data_round_trip(tmp_path):
    out, side = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    result = invoke("llama-rope", "--seq", 256, "--head-dim", 32, "--external-data", "-o", out)
    assert result.exit_code == 0, result.output
    assert side.stat().st_size == 2 * 256 * 16 * 4 and out.stat().st_size < 8192  # the tables are beside it
    model, spec = load(out)
    assert (
        spec.deploy == {"external_data": True}
        and sum(len(t.raw_data) for t in model.graph.initializer) >= 2 * 256 * 16 * 4
    )
    assert invoke("verify", out, "--runtimes", "ort-cpu,onnx-reference").exit_code == 0
    # Neither file is overwritten without --force; a lone side file blocks too.
    one_line_error(invoke("llama-rope", "--seq", 256, "--head-dim", 32, "--external-data", "-o", out), "--force")
    out.unlink()
    one_line_error(
        invoke("llama-rope", "--seq", 256, "--head-dim", 32, "--external-data", "-o", out), "m.onnx.data", "--force"
    )
    assert invoke("llama-rope", "--seq", 256, "--head-dim", 32, "--external-data", "--force", "-o", out).exit_code == 0
    side.rename(tmp_path / "moved")
    one_line_error(invoke("verify", out), "m.onnx.data", "missing")


def test_external_data_switches_on_above_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr("pe_export.files.EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "m.onnx"
    assert invoke("llama-rope", "--seq", 64, "--head-dim", 32, "-o", out).exit_code == 0
    assert (tmp_path / "m.onnx.data").exists() and load(out)[1].deploy == {"external_data": True}
    assert (
        invoke("llama-rope", "--seq", 64, "--head-dim", 32, "--no-external-data", "-o", tmp_path / "n.onnx").exit_code
        == 0
    )
    assert not (tmp_path / "n.onnx.data").exists() and load(tmp_path / "n.onnx")[1].deploy == {}
