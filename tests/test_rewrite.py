"""`pe-export rewrite` on whole models exported by torch.onnx.export(dynamo=True) from transformers 5.23.

Generated from the family table in `rewrite_models.FAMILIES` (tiny sizes, random weights, nothing
downloaded). Expected values come from the float64 torch oracle (`rewrite_models.oracle`), never from
pe-export's rewriter. The default set rewrites Llama with every --op; the other families are `slow`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import rewrite_models as rm  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

OPS = ("tables", "onnx", "ort", "decomposed")
DEFAULT_OPS = {"llama": OPS}  # the default (not slow) set: one family, every op
ONNX_OPS = ("tables", "decomposed")  # ops whose graphs every runtime here runs; onnx/ort need the fused kernels
WITHIN, GROWS = rm.WITHIN, rm.GROWS


def family_params(ops=OPS):
    out = []
    for f in rm.FAMILIES:
        for op in ops:
            slow = f.slow or op not in DEFAULT_OPS.get(f.name, ())
            out.append(pytest.param(f.name, op, id=f"{f.name}-{op}", marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """family name -> (model.onnx, config.json, float32 torch model, config), exported once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            family = rm.BY_NAME[name]
            folder = tmp_path_factory.mktemp(name)
            model, cfg = rm.build(family)
            cache[name] = (rm.export(model, folder / "model.onnx"), rm.save_config(cfg, folder), model, cfg)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def oracles():
    cache = {}

    def get(name, model, cfg):
        if name not in cache:
            cache[name] = rm.oracle(model, cfg)
        return cache[name]

    return get


@pytest.mark.parametrize("family,op", family_params())
def test_logits_error_is_position_independent(family, op, exported, oracles, tmp_path):
    from pe_export.rewriter import rewrite

    path, config, model, cfg = exported(family)
    last = rm.BY_NAME[family].last
    out = tmp_path / "rewritten.onnx"
    result = rewrite(path, config, op=op, output=out)
    assert result.sites, "no site rewritten"
    e = rm.errors(path, out, oracles(family, model, cfg), last)
    note = f"{family} --op {op}, last position {last - 1}: {json.dumps({k: f'{v:.2e}' for k, v in e.items()})}"
    assert e["rewritten_end"] <= WITHIN * e["rewritten_start"], note
    assert e["original_end"] >= GROWS * e["original_start"], note
    assert e["rewritten_end"] * GROWS <= e["original_end"], note


@pytest.mark.parametrize(
    "family", [pytest.param(f.name, marks=[] if not f.slow else [pytest.mark.slow]) for f in rm.FAMILIES]
)
def test_batch_and_one_token_decode_at_a_large_position(family, exported, oracles, tmp_path):
    from pe_export.rewriter import rewrite

    path, config, model, cfg = exported(family)
    last = rm.BY_NAME[family].last
    out = tmp_path / "rewritten.onnx"
    rewrite(path, config, output=out)
    m64 = oracles(family, model, cfg)
    start = rm.inputs(3, np.arange(64))
    decode = rm.inputs(3, np.array([last - 1]), seed=1)  # one token at the table's last position, batch 3
    err = lambda feed: float(np.abs(rm.ort_logits(out, feed) - rm.oracle_logits(m64, feed)).max())  # noqa: E731
    assert err(decode) <= WITHIN * err(start), (family, err(decode), err(start))


def test_model_io_metadata_and_no_second_rewrite(exported, tmp_path):
    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    path, config, _, _ = exported("llama")
    out = tmp_path / "rewritten.onnx"
    result = rewrite(path, config, output=out)
    before, after = onnx.load(path), onnx.load(out)
    assert [i.SerializeToString() for i in before.graph.input] == [i.SerializeToString() for i in after.graph.input]
    assert [o.SerializeToString() for o in before.graph.output] == [o.SerializeToString() for o in after.graph.output]
    spec = json.loads({p.key: p.value for p in after.metadata_props}["pe_export.rewrite"])
    assert spec["sites"][0]["params"]["theta"] == 10000.0 and spec["sites"][0]["params"]["max_positions"] == 32768
    assert not any(n.op_type in ("Cos", "Sin") for n in after.graph.node)
    assert len(result.sites) == 1
    # Every weight of the original is in the rewritten model, byte for byte (the float32 inv_freq is replaced).
    weights = {t.name: t.SerializeToString() for t in after.graph.initializer}
    for t in before.graph.initializer:
        assert "inv_freq" in t.name or weights.get(t.name) == t.SerializeToString(), t.name
    with pytest.raises(BadInput, match="already rewritten"):
        rewrite(out, config)


def test_positions_past_the_table_fail(exported, tmp_path):
    import onnxruntime as ort

    from pe_export.rewriter import rewrite

    path, config, _, _ = exported("llama")
    out = tmp_path / "short.onnx"
    rewrite(path, config, seq=1024, output=out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for bad in (1024, -1):
        with pytest.raises(Exception, match="(?i)indices|out of|invalid"):
            sess.run(None, rm.inputs(1, np.array([0, bad])))


# --- the CLI ----------------------------------------------------------------------------------------


def cli(*args):
    from pe_export.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_rewrites_verifies_and_reports(exported, tmp_path):
    path, config, _, _ = exported("llama")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = cli("rewrite", path, "--config", config, "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    row = doc["sites"][0]
    assert row["verdict"] == "pass" and row["positions"][-1] == 32767
    assert row["rewritten_error"][-1] <= row["bound"] < row["original_error"][-1]
    assert doc["whole_model"][0]["verdict"] == "pass"
    md = tmp_path / "report.md"
    assert cli("rewrite", path, "--config", config, "-o", out, "--force", "--report", md).exit_code == 0
    assert "| 0 | ort-cpu | 32767 |" in md.read_text()


def edited_config(config: Path, tmp_path: Path, **rope) -> Path:
    cfg = json.loads(config.read_text())
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **rope}
    path = tmp_path / f"edited-{'-'.join(f'{k}={v}' for k, v in rope.items())}.json"
    path.write_text(json.dumps(cfg))
    return path


def bad_inputs(exported, tmp_path):
    path, config, _, _ = exported("llama")
    text = tmp_path / "not.onnx"
    text.write_text("not a model")
    plain = tmp_path / "plain.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    onnx.save(
        onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node("Relu", ["x"], ["y"])],
                "g",
                [x],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
            )
        ),
        plain,
    )
    cfg = json.loads(config.read_text())
    cfg["head_dim"] = 32
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(cfg))
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep")
    return {
        "no RoPE site": ([plain, "--config", config], "no RoPE site"),
        "theta disagrees": ([path, "--config", edited_config(config, tmp_path, rope_theta=20000.0)], "theta"),
        "rotary dim disagrees": ([path, "--config", wide], "rotary dim"),
        "scaling disagrees": (
            [path, "--config", edited_config(config, tmp_path, rope_type="linear", factor=2.0)],
            "scaling",
        ),
        "unsupported rope type": (
            [path, "--config", edited_config(config, tmp_path, rope_type="mrope")],
            "unsupported rope_type",
        ),
        "not ONNX": ([text, "--config", config], "not an ONNX model"),
        "output exists": ([path, "--config", config, "-o", existing], "--force"),
        "no config": ([path], "--config"),
    }


BAD = [
    "no RoPE site",
    "theta disagrees",
    "rotary dim disagrees",
    "scaling disagrees",
    "unsupported rope type",
    "not ONNX",
    "output exists",
    "no config",
]


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(case, exported, tmp_path):
    args, expected = bad_inputs(exported, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    out = ["-o", tmp_path / "out.onnx"] if "-o" not in args else []
    r = cli("rewrite", *args, *out)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pe-export: error:") and expected in lines[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "output exists":
        assert (tmp_path / "exists.onnx").read_bytes() == b"keep"


def test_installed_entry_point_help():
    exe = Path(sys.executable).with_name("pe-export")
    exe = str(exe) if exe.exists() else shutil.which("pe-export")
    r = subprocess.run([exe, "rewrite", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--config" in r.stdout


def test_external_data_in_external_data_out(exported, tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from pe_export.rewriter import rewrite

    path, config, _, _ = exported("llama")
    ir.save(ir.load(path), tmp_path / "in.onnx", external_data="in.onnx.data")
    rewrite(tmp_path / "in.onnx", config, output=tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()
    feed = rm.inputs(1, np.arange(4))
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_config_keyed_by_layer_type_gives_one_parameter_set_per_type(tmp_path):
    from pe_export.rewriter.params import disagreement, match, params_from_config

    cfg = {
        "model_type": "gemma3_text",
        "head_dim": 16,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    local, full = params_from_config(path)
    assert (local.theta, local.scaling) == (10000.0, "default") and (full.theta, full.scaling) == (1e6, "linear")
    # Independent oracle: the frequencies written out from the formula, rounded to float32 as a graph holds them.
    i = np.arange(0, 16, 2) / 16
    graph_full = (1.0 / (1e6**i) / 8.0).astype(np.float32)
    graph_local = (1.0 / (1e4**i)).astype(np.float32)
    assert match(graph_full, [local, full])[0] is full and match(graph_local, [local, full])[0] is local
    assert "theta" in disagreement((1.0 / (2e4**i)).astype(np.float32), local)


def matmul_form_graph(inv_freq: np.ndarray, factor: float | None) -> onnx.ModelProto:
    """transformers 4.x's cos/sin as optimum exports it (MatMul + Transpose), written with onnx.helper."""
    h, T = onnx.helper, onnx.TensorProto
    inits = [
        onnx.numpy_helper.from_array(inv_freq.reshape(1, -1, 1), "inv_freq"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        onnx.numpy_helper.from_array(np.float32(factor or 1.0), "factor"),
    ]
    nodes = [
        h.make_node("Unsqueeze", ["position_ids", "axis1"], ["p1"]),
        h.make_node("Cast", ["p1"], ["pf"], to=T.FLOAT),
        h.make_node("MatMul", ["inv_freq", "pf"], ["f"]),
        h.make_node("Transpose", ["f"], ["ft"], perm=[0, 2, 1]),
        h.make_node("Concat", ["ft", "ft"], ["emb"], axis=-1),
        h.make_node("Cos", ["emb"], ["cos" if factor is None else "c"]),
        h.make_node("Sin", ["emb"], ["sin" if factor is None else "s"]),
    ]
    if factor is not None:
        nodes += [h.make_node("Mul", ["c", "factor"], ["cos"]), h.make_node("Mul", ["s", "factor"], ["sin"])]
    graph = h.make_graph(
        nodes,
        "rope",
        [h.make_tensor_value_info("position_ids", T.INT64, ["B", "S"])],
        [h.make_tensor_value_info(n, T.FLOAT, ["B", "S", 2 * inv_freq.size]) for n in ("cos", "sin")],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])


@pytest.mark.parametrize("scaling", ["default", "yarn"])
def test_matmul_form_of_transformers_4(scaling, tmp_path):
    import onnxruntime as ort

    from pe_export.rewriter import rewrite

    R, theta, P = 16, 10000.0, 65536
    rope = {"rope_type": "default", "rope_theta": theta}
    inv64 = 1.0 / theta ** (np.arange(0, R, 2) / R)
    factor = None
    if scaling == "yarn":  # transformers' YaRN written out in float64: ramp between beta_fast 32 and beta_slow 1
        s, orig = 4.0, 16384
        rope = {"rope_type": "yarn", "rope_theta": theta, "factor": s, "original_max_position_embeddings": orig}
        low = np.floor(R * np.log(orig / (32 * 2 * np.pi)) / (2 * np.log(theta)))
        high = np.ceil(R * np.log(orig / (1 * 2 * np.pi)) / (2 * np.log(theta)))
        ramp = np.clip((np.arange(R // 2) - low) / (high - low), 0, 1)
        inv64 = inv64 / s * ramp + inv64 * (1 - ramp)
        factor = 0.1 * np.log(s) + 1.0
    cfg = {
        "model_type": "llama",
        "head_dim": R,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": P,
        "rope_parameters": rope,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = matmul_form_graph(inv64.astype(np.float32), None if factor is None else float(factor))
    result = rewrite(model, tmp_path / "config.json", output=tmp_path / "out.onnx")
    assert {s.rule for s in result.sites} == {"cos_sin_matmul" + ("_factor" if factor else "")}
    pos = np.array([[0, 1, 1000, P - 2, P - 1]])
    cos, sin = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"position_ids": pos}
    )
    angle = pos[0, :, None] * np.concatenate([inv64, inv64])
    F = factor or 1.0
    assert (
        np.abs(cos[0] - np.cos(angle) * F).max() <= 2 * 2.0**-24 * F
        and np.abs(sin[0] - np.sin(angle) * F).max() <= 2 * 2.0**-24 * F
    )


def test_float32_inv_freq_as_transformers_computes_it_agrees_and_a_wrong_theta_is_named():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pe_export.encodings.rope import RopeParams
    from pe_export.rewriter.params import disagreement

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=16, max_position_embeddings=131072, rope_parameters=rope)
    graph, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))  # float32, transformers' own arithmetic
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_positions": 8192}
    p = RopeParams(head_dim=128, theta=500000.0, max_positions=131072, scaling="llama3", scaling_params=scaling)
    assert disagreement(graph.numpy(), p) is None
    assert disagreement(
        graph.numpy(),
        RopeParams(head_dim=128, theta=500050.0, max_positions=131072, scaling="llama3", scaling_params=scaling),
    ).startswith("theta")


# --- verification on every runtime ------------------------------------------------------------------


def rewritten_in_memory(exported, family="llama", op="tables"):
    from pe_export.rewriter import apply as api

    path, config, _, _ = exported(family)
    original = api.load(path)
    return original, api.rewrite(api.load(path), config, op=op)


def test_rewrite_verified_on_other_runtimes_in_workers(exported):
    """onnx's reference evaluator and OpenVINO run the torch.onnx graph and verify it; tract loads the
    whole model but fails to run it, original and rewritten alike (its CumSum: "TDim is not a number"): a
    row with the reason, "unsupported" (the runtime's limit, not the rewrite's), not the end of the
    report. Its site row runs a copy pruned to the cos/sin computation, which it runs and verifies."""
    from pe_export.rewriter import checks as verify

    original, result = rewritten_in_memory(exported)
    names = ("onnx-reference", "openvino", "tract")
    rows = {r.runtime: r for r in verify.check_sites(original, result.model, result.sites, names)}
    whole = {r.runtime: r for r in verify.check_whole(original, result.model, names)}
    assert rows["onnx-reference"].verdict == "pass" and whole["onnx-reference"].verdict == "pass", (rows, whole)
    r = rows["onnx-reference"]
    assert r.positions[-1] == 32767 and r.rewritten_error[-1] <= r.bound < r.original_error[-1]
    if rows["openvino"].verdict != "skipped":  # the optional openvino extra
        assert rows["openvino"].verdict == "pass" and whole["openvino"].verdict == "pass", (
            rows["openvino"],
            whole["openvino"],
        )
        assert rows["openvino"].rewritten_error[-1] <= rows["openvino"].bound
    if rows["tract"].verdict != "skipped":
        assert rows["tract"].verdict == "pass" and rows["tract"].rewritten_error[-1] <= rows["tract"].bound
        assert whole["tract"].verdict == "unsupported" and "the original too" in whole["tract"].note, whole["tract"]
        assert whole["tract"].verdict == "unsupported" and whole["tract"].max_abs_diff is None
    assert not verify.failed([rows["onnx-reference"], whole["onnx-reference"], rows["tract"]])


def test_a_crashing_runtime_is_a_row_and_the_others_complete(exported, monkeypatch):
    import fake_runtimes

    from pe_export.rewriter import checks as verify
    from pe_export.runtimes import GRAPH_RUNTIMES

    monkeypatch.setitem(GRAPH_RUNTIMES, "aborts", fake_runtimes.aborts_graph)
    original, result = rewritten_in_memory(exported)
    rows = verify.check_sites(original, result.model, result.sites, ("aborts", "ort-cpu"))
    whole = verify.check_whole(original, result.model, ("aborts", "ort-cpu"))
    assert [r.verdict for r in rows] == ["CRASH", "pass"], rows
    assert "SIGABRT" in rows[0].note and rows[0].rewritten_error == [], rows[0]
    assert [r.verdict for r in whole] == ["CRASH", "pass"] and "SIGABRT" in whole[0].note, whole
    assert verify.failed(rows) and not verify.failed(rows[1:])


def test_cli_runtimes_choices_and_a_cannot_load_row(exported, tmp_path):
    """--op ort writes com.microsoft ops: tract cannot load them, a row with the reason (exit 0: nothing
    failed, ORT verified it); an unknown runtime is bad input."""
    path, config, _, _ = exported("llama")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = cli(
        "rewrite", path, "--config", config, "--op", "ort", "-o", out, "--report", report, "--runtimes", "ort-cpu,tract"
    )
    assert r.exit_code == 0, r.output
    rows = {row["runtime"]: row for row in json.loads(report.read_text())["sites"]}
    assert rows["ort-cpu"]["verdict"] == "pass"
    if rows["tract"]["verdict"] != "skipped":  # the optional tract extra
        assert rows["tract"]["verdict"] == "unsupported" and "cannot load" in rows["tract"]["note"], rows["tract"]
        assert "com.microsoft" in rows["tract"]["note"]
    bad = cli("rewrite", path, "--config", config, "-o", tmp_path / "x.onnx", "--runtimes", "torch")
    assert bad.exit_code == 2 and "--runtimes" in bad.output and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("fails_for, verdict", [("both", "unsupported"), ("rewritten", "FAIL")])
def test_rotated_q_and_k_a_runtime_returns_in_another_shape_are_a_row(fails_for, verdict, exported, monkeypatch):
    """OpenVINO 2026.4 gives a rotated part of GPT-NeoX's partial rotary back under its name with the whole head
    (it moves the name onto the fused Concat): the rotation cannot be compared. That is a row, never the
    end of the report: `unsupported` when the original's read back fails the same way (the runtime's),
    FAIL when only the rewritten's does."""
    from pe_export.rewriter import checks as verify

    original, result = rewritten_in_memory(exported, op="onnx")
    real, calls = verify.rotation_error, []

    def shaped(got, *args):  # the rewritten's values are read first, then the original's
        calls.append(1)
        if len(calls) == 1 or fails_for == "both":
            raise ValueError("operands could not be broadcast together with shapes (1,4,11,32) (1,4,11,8)")
        return real(got, *args)

    monkeypatch.setattr(verify, "rotation_error", shaped)
    [row] = [
        r for r in verify.check_sites(original, result.model, result.sites, ("ort-cpu",)) if r.what == "rotated q/k"
    ]
    assert row.verdict == verdict and "rotated q/k not comparable: operands could not" in row.note, row


@pytest.mark.parametrize("op", ["onnx", "ort", "decomposed"])
def test_rotated_q_and_k_against_a_float64_rotation_of_the_same_runs_inputs(op, exported):
    """Each replaced rotation's output against pe_export.custom_ops.rotation.apply_reference (float64) of its own
    un-rotated q/k read from the same run, at positions up to the table's end; the original's rotations
    drift (float32 angles), the rewritten's stay within the tolerance table's bound. A wrong pairing
    (the check reading the rotation as interleaved) must fail: the check can fail."""
    import copy

    from pe_export.rewriter import checks as verify

    original, result = rewritten_in_memory(exported, op=op)
    site = result.sites[0]
    assert site.rotations == 4 and len(site.rotated) == 4  # q and k of 2 layers
    rows = [
        r for r in verify.check_sites(original, result.model, result.sites, ("ort-cpu",)) if r.what == "rotated q/k"
    ]
    assert len(rows) == 1 and rows[0].verdict == "pass", rows
    r = rows[0]
    assert (
        r.positions[-1] == 32767
        and max(r.rewritten_error) <= r.bound
        and max(r.original_error[-3:]) > 100 * max(r.rewritten_error[-3:])
    ), r
    wrong = copy.deepcopy(site)
    wrong.rotated = [{**rot, "pairing": "interleaved"} for rot in wrong.rotated]
    bad = [r for r in verify.check_sites(original, result.model, [wrong], ("ort-cpu",)) if r.what == "rotated q/k"]
    assert bad[0].verdict == "FAIL", bad


def test_kv_cache_decode_one_token_at_a_large_position(tmp_path):
    """A layer with past_key/past_value inputs (transformers' Llama rotary and apply_rotary_pos_emb,
    exported with dynamo): verification's own inputs (an empty cache, from the signature) pass, and one
    token decoded at the table's last position on a cache of 64 tokens, batch 2, matches the float64 oracle
    as well as one decoded at position 64; the original's error there is far larger. The cache itself is
    the oracle's prefill (float64, rounded to float32): logits and present key/values are compared."""
    from pe_export.rewriter import apply as api
    from pe_export.rewriter import checks as verify

    model, cfg = rm.build_cached()
    path = rm.export_cached(model, tmp_path / "kv.onnx")
    config = rm.save_config(cfg, tmp_path)
    out = tmp_path / "kv.pe.onnx"
    result = api.rewrite(path, config, op="decomposed", output=out)
    assert [r.verdict for r in verify.check_whole(api.load(path), result.model, ("ort-cpu",))] == ["pass"]
    m64 = rm.cached_oracle(model, cfg)
    H, D = model.heads, model.dim

    def decode_error(file, last):
        rng = np.random.default_rng(0)
        prefill = {
            "input_ids": rng.integers(0, rm.VOCAB, (2, 64)),
            "position_ids": np.repeat(np.arange(last - 65, last - 1)[None], 2, 0),
            "past_key": np.zeros((2, H, 0, D)),
            "past_value": np.zeros((2, H, 0, D)),
        }
        _, k, v = rm.run_cached(m64, prefill)
        feed = {
            "input_ids": rng.integers(0, rm.VOCAB, (2, 1)),
            "position_ids": np.full((2, 1), last - 1),
            "past_key": k.astype(np.float32),
            "past_value": v.astype(np.float32),
        }
        truth = rm.run_cached(m64, feed)
        got = rm.ort_outputs(file, feed)
        assert got[1].shape == (2, H, 65, D)
        return max(float(np.abs(g - t).max()) for g, t in zip(got, truth))

    start, end = decode_error(out, 65), decode_error(out, rm.CACHED.last)
    original_end = decode_error(path, rm.CACHED.last)
    assert end <= WITHIN * start and original_end >= GROWS * end, (start, end, original_end)


@pytest.mark.parametrize("op", ["onnx", "ort", "decomposed"])
def test_a_failed_step_leaves_the_in_memory_model_unchanged(op, tmp_path):
    """The cos/sin pass succeeds on this graph (cos/sin are its outputs, no rotation reads them), then
    the rotation pass (after --op onnx's opset conversion) finds nothing and fails: the onnx_ir.Model
    passed in serializes byte for byte as before, and a successful rewrite leaves it unchanged too."""
    import onnx_ir as ir

    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    R, theta = 16, 10000.0
    cfg = {
        "model_type": "llama",
        "head_dim": R,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = ir.from_proto(matmul_form_graph((1.0 / theta ** (np.arange(0, R, 2) / R)).astype(np.float32), None))
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(BadInput, match="no q/k rotation"):
        rewrite(model, tmp_path / "config.json", op=op)
    assert ir.to_proto(model).SerializeToString() == before
    result = rewrite(model, tmp_path / "config.json")
    assert result.model is not model and result.sites and ir.to_proto(model).SerializeToString() == before


def test_dynamic_ntk_keeps_its_run_time_rescaling(tmp_path):
    """rope_type "dynamic": the traced graph froze the example's branch (unscaled inv_freq); the rewrite
    computes cos/sin in the graph in float64 from max(position) + 1 again. Logits against the float64
    oracle (transformers' own dynamic init function in float64, a fresh module's growth) below the
    original length, across it and at the end of factor x its table; --op onnx|ort|decomposed refused."""
    from pe_export.errors import BadInput
    from pe_export.rewriter import apply as api
    from pe_export.rewriter import checks as verify

    model, cfg = rm.build(rm.DYNAMIC)
    path, config, out = (
        rm.export_frozen(model, tmp_path / "dyn.onnx"),
        rm.save_config(cfg, tmp_path),
        tmp_path / "dyn.pe.onnx",
    )
    result = api.rewrite(path, config, output=out)
    assert [s.tables for s in result.sites] == [[]] and not any(
        n.op_type == "Gather" and "pe_export.rope" in n.input[0] for n in onnx.load(out).graph.node
    )
    m64 = rm.oracle(model, cfg)
    err = {}
    for where, pos in (
        ("start", np.arange(64)),
        ("across", np.arange(4096 - 32, 4096 + 32)),
        ("end", np.arange(rm.DYNAMIC.last - 64, rm.DYNAMIC.last)),
    ):
        feed = rm.inputs(1, pos)
        truth = rm.oracle_logits(m64, feed)
        err[where] = {
            k: float(np.abs(rm.ort_logits(f, feed) - truth).max()) for k, f in (("rewritten", out), ("original", path))
        }
    assert (
        err["across"]["rewritten"] <= WITHIN * err["start"]["rewritten"]
        and err["end"]["rewritten"] <= WITHIN * err["start"]["rewritten"]
    ), err
    assert (
        err["end"]["original"] >= GROWS * err["end"]["rewritten"]
        and err["across"]["original"] >= GROWS * err["across"]["rewritten"]
    ), err
    rows = verify.check_sites(api.load(path), result.model, result.sites, ("ort-cpu",))
    assert rows[0].verdict == "pass" and rows[0].positions[-1] == rm.DYNAMIC.last - 1, rows
    with pytest.raises(BadInput, match="dynamic NTK"):
        api.rewrite(path, config, op="decomposed")


@pytest.mark.slow
@pytest.mark.parametrize("family", [f.name for f in rm.FAMILIES])
def test_every_family_verifies_its_rotated_q_and_k_as_written(family, exported):
    """--op decomposed, pruned as written: every site has a rotated q/k row that passes up to the end of
    its table (LongRoPE: each branch over the positions it serves; GPT-J: interleaved pairs, bshd)."""
    from pe_export.rewriter import apply as api
    from pe_export.rewriter import checks as verify

    path, config, _, _ = exported(family)
    result = api.rewrite(api.load(path), config, op="decomposed")
    api.prune(result.model)
    rows = [
        r
        for r in verify.check_sites(api.load(path), result.model, result.sites, ("ort-cpu",))
        if r.what == "rotated q/k"
    ]
    assert len(rows) == len(result.sites) and all(r.verdict == "pass" for r in rows), rows
    assert max(r.positions[-1] for r in rows) == rm.BY_NAME[family].last - 1


def test_a_hanging_runtime_is_a_timeout_row(exported, monkeypatch):
    import fake_runtimes

    from pe_export.rewriter import checks as verify
    from pe_export.runtimes import GRAPH_RUNTIMES

    monkeypatch.setitem(GRAPH_RUNTIMES, "hangs", fake_runtimes.hangs_graph)
    original, result = rewritten_in_memory(exported)
    rows = verify.check_whole(original, result.model, ("hangs", "ort-cpu"), timeout=3)
    assert [r.verdict for r in rows] == ["TIMEOUT", "pass"] and "no answer within 3 s" in rows[0].note, rows


def test_cli_unverified_when_no_runtime_ran_it(exported, tmp_path, monkeypatch):
    import fake_runtimes

    from pe_export.runtimes import GRAPH_RUNTIMES

    monkeypatch.setitem(GRAPH_RUNTIMES, "ort-cuda", fake_runtimes.skips_graph)  # a runtime that is not here
    path, config, _, _ = exported("llama")
    r = cli("rewrite", path, "--config", config, "-o", tmp_path / "out.onnx", "--runtimes", "ort-cuda")
    assert r.exit_code == 1 and "unverified" in r.output and (tmp_path / "out.onnx").is_file(), r.output


@pytest.mark.parametrize("op", OPS)
def test_the_rewrite_writes_its_constants_as_tensors(op, exported):
    """Every Constant the rewrite adds holds a `value` tensor: onnx2tf (the litert runtime) converts no
    Constant given as `value_int` / `value_ints` ("Constant node without value is not supported")."""
    import onnx_ir as ir

    from pe_export.rewriter import apply as api

    path, config, _, _ = exported("llama")
    before = {n.name for n in api.load(path).graph}
    result = api.rewrite(api.load(path), config, op=op)
    added = [
        n
        for n in ir.traversal.RecursiveGraphIterator(result.model.graph)
        if n.op_type == "Constant" and n.name not in before
    ]
    assert added, "the rewrite adds constants (the table's row count, reshape shapes)"
    assert all(set(n.attributes) == {"value"} for n in added), [
        (n.name, list(n.attributes)) for n in added if set(n.attributes) != {"value"}
    ]


def test_a_frozen_longrope_export_is_restored_and_its_logits_are_flat(exported, oracles, tmp_path):
    """Phi-3 LongRoPE exported with its run-time switch frozen at trace time (the graph holds one branch, as
    optimum's export of transformers 4.57 does): the rewrite restores both float64 tables and the switch at
    original_max_position_embeddings, and the logits at the last 64 positions of 131072 are within 3x of
    positions 0-63 against the float64 model with the switch, where the frozen original is far off."""
    from pe_export.rewriter import rewrite

    _, config, model, cfg = exported("phi3-longrope")
    frozen = rm.export_frozen(model, tmp_path / "frozen.onnx")
    out = tmp_path / "rewritten.onnx"
    result = rewrite(frozen, config, output=out)
    assert any(site.restored for site in result.sites), [site.rule for site in result.sites]
    e = rm.errors(frozen, out, oracles("phi3-longrope", model, cfg), rm.BY_NAME["phi3-longrope"].last)
    note = json.dumps({k: f"{v:.2e}" for k, v in e.items()})
    assert e["rewritten_end"] <= WITHIN * e["rewritten_start"], note
    assert e["rewritten_end"] * GROWS <= e["original_end"], note
