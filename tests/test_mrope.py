"""M-RoPE (pe_export.encodings.mrope) against transformers 5.23's own Qwen2-VL and Qwen3-VL text rotary
modules (`recomposition_frequencies`) and `apply_rotary_pos_emb`, run in float64 on angles from the
formula; the exported graphs (every op target, both layouts) against the float64 reference on every
runtime `check` has here; `from-config` on Qwen2-VL, Qwen2.5-VL and Qwen3-VL style configs, read the
same way by transformers' AutoConfig; and the parameter checks. Presets come from the registry."""

import json

import numpy as np
import pytest
from conftest import exported, ort_cpu_session
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.encodings import ENCODINGS
from pe_export.encodings.mrope import MropeParams, component_of_pair, mrope_position_cases, mrope_tables
from pe_export.encodings.rope import RopeParams, rope_reference
from pe_export.hf_config import rope_params_from_config
from pe_export.presets import PRESETS
from pe_export.spec import OP_NAMES, Spec

MROPE_PRESETS = [n for n, p in PRESETS.items() if p.encoding == "mrope"]
SMALL = dict(max_positions=512)  # the presets' head dims and sections, a short table


def spec_for(preset, op="onnx", dtype="fp32", layout="bhsd", **extra):
    params = {**PRESETS[preset].params, **SMALL, **extra}
    return Spec(encoding="mrope", params=params, op=op, opset=OP_TARGETS[op].min_opset, dtype=dtype, layout=layout)


def transformers_oracle(preset_params: dict, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """transformers' M-RoPE in float64: angles position * inv_freq from the formula, recomposed by the
    model's own rotary module, applied by its own apply_rotary_pos_emb. x (B, H, S, D); positions (3, B, S)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    p = preset_params
    head_dim, section = p["head_dim"], p["mrope_section"]
    common = dict(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=p["max_positions"],
    )
    rope = dict(rope_type="default", rope_theta=p["theta"], mrope_section=section)
    if p.get("mrope_interleaved"):
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as Rotary
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        config = Qwen3VLTextConfig(head_dim=head_dim, rope_parameters={**rope, "mrope_interleaved": True}, **common)
    else:
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding as Rotary
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

        config = Qwen2VLTextConfig(rope_parameters=rope, **common)
    rotary = Rotary(config)
    assert rotary.mrope_section == section
    # inv_freq from the formula in float64 (transformers forms it in float32: same to float32 rounding).
    inv_freq = 1.0 / p["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (R/2,)
    np.testing.assert_allclose(rotary.inv_freq.double().numpy(), inv_freq, rtol=2e-7)
    angles = torch.from_numpy(positions[..., None].astype(np.float64) * inv_freq)  # (3, B, S, R/2)
    cos = rotary.recomposition_frequencies(angles.cos() * rotary.attention_scaling)  # (B, S, R)
    sin = rotary.recomposition_frequencies(angles.sin() * rotary.attention_scaling)
    q = torch.from_numpy(np.asarray(x, dtype=np.float64))
    y, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return y.numpy()


@pytest.mark.parametrize("preset", MROPE_PRESETS)
def test_reference_is_transformers(preset):
    """Every probe case (text, image with T, H, W apart, scattered, decode of one token at a large
    position, every row of each component), batch 2, at the last positions of each component."""
    spec = spec_for(preset)
    enc = ENCODINGS.get("mrope")
    for name, inputs in enc.probes(spec, np.random.default_rng(0)):
        ours = enc.reference(spec, inputs)
        theirs = transformers_oracle(spec.params, inputs["x"], inputs["position_ids"])
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12, err_msg=name)


def test_probes_reach_the_last_row_of_each_component_with_distinct_positions():
    cases = dict(mrope_position_cases(512, np.random.default_rng(0), batch=2))
    for name in ("image", "scattered", "decode", "all"):
        ids = cases[name]
        assert ids.shape[0] == 3 and ids.min() >= 0 and ids.max() == 511
        assert not (ids[0] == ids[1]).all() and not (ids[1] == ids[2]).all(), name
    assert (cases["image"].max(axis=(1, 2)) == 511).all()
    assert cases["decode"].shape[1:] == (2, 1) and not (cases["decode"][:, 0] == cases["decode"][:, 1]).all()
    assert all((np.sort(c) == np.arange(512)).all() for c in cases["all"][:, 0])


@pytest.mark.parametrize("preset", MROPE_PRESETS)
def test_text_tokens_are_plain_rope(preset):
    """Three equal positions: M-RoPE is RoPE at that position (property of both layouts)."""
    spec = spec_for(preset)
    rope_params = {k: v for k, v in spec.params.items() if not k.startswith("mrope")}
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 512, (2, 9))
    x = rng.standard_normal((2, 3, 9, spec.params["head_dim"]))
    ours = ENCODINGS.get("mrope").reference(spec, {"x": x, "position_ids": np.stack([ids] * 3)})
    plain = rope_reference(Spec(encoding="rope", params=rope_params), {"x": x, "position_ids": ids})
    np.testing.assert_array_equal(ours, plain)  # the same table entries, the same NumPy arithmetic
    RopeParams(**rope_params)


def test_sections_follow_the_two_layouts():
    chunked = MropeParams(head_dim=128, mrope_section=[16, 24, 24])
    assert component_of_pair(chunked).tolist() == [0] * 16 + [1] * 24 + [2] * 24
    inter = MropeParams(head_dim=128, mrope_section=[24, 20, 20], mrope_interleaved=True)
    got = component_of_pair(inter)
    assert got[:6].tolist() == [0, 1, 2, 0, 1, 2] and (got[60:] == 0).all()
    assert np.bincount(got).tolist() == [24, 20, 20]


def test_mrope_tables_select_rows_entry_by_entry():
    p = MropeParams(head_dim=16, mrope_section=[2, 3, 3], max_positions=64)
    positions = np.array([[[5]], [[40]], [[63]]])  # (3, 1, 1)
    cos, sin = mrope_tables(p, positions)
    plain_cos, plain_sin = RopeParams(head_dim=16, max_positions=64).cos_sin()
    want = np.concatenate([plain_cos[5, :2], plain_cos[40, 2:5], plain_cos[63, 5:]])
    np.testing.assert_array_equal(cos[0, 0], want)
    assert cos.shape == sin.shape == (1, 1, 8)


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(head_dim=16, mrope_section=[2, 3, 2]), "must sum to rotary_dim / 2 = 8"),
        (dict(head_dim=16, mrope_section=[2, 3]), "must be 3 integers"),
        (dict(head_dim=16, mrope_section=[2, 3.0, 3]), "must be 3 integers"),
        (dict(head_dim=16, mrope_section=[0, 4, 4], mrope_interleaved=True), r"3 \* h and 3 \* w must"),
        (dict(head_dim=16, mrope_section=[2, 3, 3], tables="computed"), "constant tables"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        MropeParams(**params)


def verified_rows(spec, runtimes):
    from pe_export.verification.parity import check

    rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=runtimes)}
    failures = [f"{r.runtime}: {r.note}" for r in rows.values() if r.verdict == "FAIL"]
    assert not failures, failures
    return rows


# Default: each op target once, chunked and interleaved both seen; slow: every preset x target, OpenVINO too.
FAST = [("qwen2-vl-mrope", "onnx"), ("qwen3-vl-mrope", "ort"), ("qwen3-vl-mrope", "decomposed")]
FULL = [(p, op) for p in MROPE_PRESETS for op in OP_NAMES]
ALL_RUNTIMES = ("torch", "ort-cpu", "ort-cpu-noopt", "onnx-reference", "openvino")


@pytest.mark.parametrize(
    "preset,op,runtimes",
    [(p, op, ("torch", "ort-cpu", "onnx-reference")) for p, op in FAST]
    + [pytest.param(p, op, ALL_RUNTIMES, marks=pytest.mark.slow) for p, op in FULL],
)
def test_export_passes_every_runtime(preset, op, runtimes):
    rows = verified_rows(spec_for(preset, op=op), runtimes)
    assert rows["torch"].verdict == rows["ort-cpu"].verdict == "pass"
    assert rows["onnx-reference"].verdict == ("skipped" if op == "ort" else "pass")  # no com.microsoft ops there


@pytest.mark.parametrize(
    "dtype,layout",
    [("fp16", "bshd")]
    + [
        pytest.param(d, lay, marks=pytest.mark.slow)
        for d, lay in (("fp16", "bhsd"), ("bf16", "bshd"), ("bf16", "bhsd"))
    ],
)
def test_export_dtypes_and_layouts(dtype, layout):
    rows = verified_rows(
        spec_for("qwen3-vl-mrope", op="decomposed", dtype=dtype, layout=layout), ("torch", "ort-cpu", "onnx-reference")
    )
    assert rows["torch"].verdict == rows["onnx-reference"].verdict == "pass"


@pytest.mark.parametrize("preset,op", FAST)
def test_ort_output_is_transformers_in_fp32(preset, op):
    """The exported graph on ONNX Runtime CPU against transformers' float64 oracle directly: image
    tokens, batch 2, decode at the last positions."""
    spec = spec_for(preset, op=op)
    session = ort_cpu_session(exported(spec))
    assert session.get_providers()[0] == "CPUExecutionProvider"
    rng = np.random.default_rng(2)
    for name, ids in mrope_position_cases(512, rng, batch=2)[1:4]:
        x = rng.standard_normal((2, 3, ids.shape[2], 128), dtype=np.float32)
        y = session.run(None, {"x": x, "position_ids": ids})[0]
        want = transformers_oracle(spec.params, x, ids)
        # fp32 tables and arithmetic: a few float32 roundings of |a| + |b| <= ~8.
        np.testing.assert_allclose(y, want, rtol=0, atol=8 * 2**-23 * 8, err_msg=name)


@pytest.mark.parametrize("preset,op", [c for c in FAST if c[1] != "ort"])  # exported already
def test_positions_outside_the_table_fail(preset, op):
    spec = spec_for(preset, op=op)
    import torch

    session = ort_cpu_session(exported(spec))
    module = ENCODINGS.get("mrope").module(spec)
    x = np.zeros((1, 1, 1, 128), dtype=np.float32)
    for bad in (-1, 512):
        for component in range(3):
            ids = np.zeros((3, 1, 1), dtype=np.int64)
            ids[component] = bad
            with pytest.raises(Exception, match="out of|index|bounds|range"):
                session.run(None, {"x": x, "position_ids": ids})
            with pytest.raises((IndexError, RuntimeError), match="out of range"):
                module(torch.from_numpy(x), torch.from_numpy(ids))


# ---------------------------------------------------------------------------------------------------
# from-config: the M-RoPE keys at the top level (Qwen2-VL) or under text_config (Qwen2.5-VL, Qwen3-VL).


def write(folder, cfg) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def qwen_configs(tmp_path) -> dict:
    """{preset: config.json path} in each family's checkpoint shape, with the preset's values."""
    q2 = PRESETS["qwen2-vl-mrope"].params
    q3 = PRESETS["qwen3-vl-mrope"].params
    text2 = dict(hidden_size=8192, num_attention_heads=64, max_position_embeddings=32768)
    return {
        "qwen2-vl-mrope": write(
            tmp_path / "qwen2-vl",
            dict(
                model_type="qwen2_vl",
                **text2,
                rope_theta=q2["theta"],
                rope_scaling=dict(type="mrope", mrope_section=q2["mrope_section"]),
            ),
        ),
        "qwen2.5-vl-mrope": write(
            tmp_path / "qwen2.5-vl",
            dict(
                model_type="qwen2_5_vl",
                text_config=dict(
                    model_type="qwen2_5_vl_text",
                    **text2,
                    rope_parameters=dict(rope_type="default", rope_theta=q2["theta"], mrope_section=[16, 24, 24]),
                ),
            ),
        ),
        "qwen3-vl-mrope": write(
            tmp_path / "qwen3-vl",
            dict(
                model_type="qwen3_vl",
                text_config=dict(
                    model_type="qwen3_vl_text",
                    hidden_size=4096,
                    num_attention_heads=32,
                    head_dim=128,
                    max_position_embeddings=128000,
                    rope_scaling=dict(
                        rope_type="default", rope_theta=q3["theta"], mrope_section=[24, 20, 20], mrope_interleaved=True
                    ),
                ),
            ),
        ),
    }


def test_every_mrope_preset_has_a_config(tmp_path):
    assert set(qwen_configs(tmp_path)) == set(MROPE_PRESETS)


@pytest.mark.parametrize("preset", MROPE_PRESETS)
def test_config_gives_the_preset(tmp_path, preset):
    params = rope_params_from_config(qwen_configs(tmp_path)[preset])
    assert MropeParams(**params) == MropeParams(**PRESETS[preset].params), params


@pytest.mark.parametrize("preset", MROPE_PRESETS)
def test_transformers_reads_the_same_sections(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    path = qwen_configs(tmp_path)[preset]
    config = transformers.AutoConfig.from_pretrained(str(path.parent))
    text = config.get_text_config()
    ours = rope_params_from_config(path)
    assert text.rope_parameters["mrope_section"] == ours["mrope_section"]
    assert text.rope_parameters["rope_theta"] == ours["theta"]
    assert text.rope_parameters.get("mrope_interleaved", False) == ours["mrope_interleaved"]


def test_from_config_exports_qwen2_vl(tmp_path):
    """The issue's case: a Qwen2-VL config used to exit 2 ("'mrope_section' is not a parameter")."""
    path = qwen_configs(tmp_path)["qwen2-vl-mrope"]
    out = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    args = ["from-config", str(path), "--seq", "256", "-o", str(out), "--report", str(report)]
    args += ["--op", "decomposed", "--dtype", "fp16", "--layout", "bshd", "--runtimes", "torch,ort-cpu,onnx-reference"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mrope_section=[16, 24, 24]" in result.output and out.exists()
    rows = {r["runtime"]: r["verdict"] for r in json.loads(report.read_text())["rows"]}
    assert rows == {"torch": "pass", "ort-cpu": "pass", "onnx-reference": "pass"}, rows


def test_preset_command_and_refusals(tmp_path):
    out = tmp_path / "q.onnx"
    common = ["--seq", "64", "-o", str(out), "--runtimes", "torch,ort-cpu"]
    for extra, message in [
        (["--static-shapes", "1,16,2"], "--static-shapes does not apply to mrope yet"),
        (["--attention"], "has no --attention layer yet"),
        (["--head-dim", "64"], "mrope_section must sum to rotary_dim / 2 = 32"),
    ]:
        result = CliRunner().invoke(app, ["qwen3-vl-mrope", *common, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists()


@pytest.mark.parametrize(
    "section,message",
    [([16, 24, 23], "mrope_section must sum to rotary_dim / 2 = 64"), ("16,24,24", "must be a list of 3 integers")],
)
def test_from_config_bad_section(tmp_path, section, message):
    cfg = dict(
        model_type="qwen2_vl",
        hidden_size=8192,
        num_attention_heads=64,
        rope_scaling=dict(type="mrope", mrope_section=section),
    )
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(app, ["from-config", str(write(tmp_path, cfg)), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", MROPE_PRESETS)
def test_presets_at_full_length(preset):
    """Each preset at its own table length (32768 or 128000 positions): ORT CPU and torch."""
    p = PRESETS[preset]
    spec = Spec(encoding="mrope", params=p.params, op="onnx", opset=23)
    rows = verified_rows(spec, ("torch", "ort-cpu"))
    assert rows["ort-cpu"].verdict == "pass"


# ---------------------------------------------------------------------------------------------------
# What ONNX Runtime's kernels accept (written down in docs/mrope-notes.md), against the float64 reference.


def run_node(node, feeds: dict, opsets: dict) -> np.ndarray:
    from onnx import TensorProto, helper

    types = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("int64"): TensorProto.INT64}
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, types[v.dtype], None) for n, v in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, ir_version=10)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid(d, v) for d, v in opsets.items()])
    session = ort_cpu_session(model.SerializeToString())
    assert session.get_providers()[0] == "CPUExecutionProvider"
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("interleaved,section", [(False, [2, 3, 3]), (True, [4, 2, 2])])
def test_ort_kernels(interleaved, section):
    from onnx import helper

    spec = Spec(
        encoding="mrope",
        params=dict(head_dim=16, mrope_section=section, mrope_interleaved=interleaved, max_positions=64),
    )
    enc = ENCODINGS.get("mrope")
    p = enc.parse(spec)
    rng = np.random.default_rng(3)
    B, H, S = 2, 3, 5
    x = rng.standard_normal((B, H, S, 16), dtype=np.float32)
    ids = rng.integers(0, 64, (3, B, S))
    want = enc.reference(spec, {"x": x, "position_ids": ids})
    cos, sin = (t.astype(np.float32) for t in mrope_tables(p, ids))  # (B, S, R/2) per token
    table_cos, table_sin = (t.astype(np.float32) for t in p.cos_sin())  # (P, R/2)
    bound = 8 * 2**-24 * np.abs(x).max() * 2
    msft = {"": 17, "com.microsoft": 1}
    # The standard op (opset 23) takes per-token (B, S, R/2) caches when position_ids is omitted.
    y = run_node(helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"]), dict(x=x, cos=cos, sin=sin), {"": 23})
    np.testing.assert_allclose(y, want, rtol=0, atol=bound)
    # ORT's contrib RotaryEmbedding needs 2-D caches: per-token rows go in as (B*S, R/2) at 0 .. B*S - 1.
    feeds = dict(x=x, pos=ids[0], cos=cos, sin=sin)
    with pytest.raises(Exception, match="cos_cache' is expected to have 2 dimensions"):
        run_node(
            helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain="com.microsoft"), feeds, msft
        )
    # ORT's contrib MRotaryEmbedding has a CPU kernel in 1.32: (P, R/2) tables, positions (3, B, S), both layouts.
    node = helper.make_node(
        "MRotaryEmbedding",
        ["x", "pos", "cos", "sin"],
        ["y"],
        domain="com.microsoft",
        mrope_section=section,
        mrope_layout=int(interleaved),
    )
    y = run_node(node, dict(x=x, pos=ids, cos=table_cos, sin=table_sin), msft)
    np.testing.assert_allclose(y, want, rtol=0, atol=bound)


def test_public_api_in_a_users_model():
    """pe_export.MRotaryEmbedding in a user's module, exported with pe_export.translation_table, on ORT CPU."""
    import io

    import torch

    import pe_export

    p = pe_export.preset("qwen3-vl-mrope", max_positions=256)
    assert isinstance(p, MropeParams)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = pe_export.MRotaryEmbedding(p)

        def forward(self, q, position_ids):
            return self.rope(q, position_ids) * 2.0

    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 4, 6, 128), dtype=np.float32)
    ids = rng.integers(0, 256, (3, 2, 6))
    buf = io.BytesIO()
    program = torch.onnx.export(
        Attn().eval(),
        (torch.from_numpy(q), torch.from_numpy(ids)),
        dynamo=True,
        opset_version=23,
        custom_translation_table=pe_export.translation_table("onnx"),
        dynamic_shapes={"q": {0: "B", 2: "S"}, "position_ids": {1: "B", 2: "S"}},
    )
    buf.write(program.model_proto.SerializeToString())
    y = ort_cpu_session(buf.getvalue()).run(None, {"q": q, "position_ids": ids})[0]
    cos, sin = pe_export.mrope_tables(p, ids)  # (B, S, R/2) float64
    assert cos.shape == (2, 6, 64)
    want = 2.0 * transformers_oracle(
        {**PRESETS["qwen3-vl-mrope"].params, "max_positions": 256}, q.astype(np.float64), ids
    )
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5)
