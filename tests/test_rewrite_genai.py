"""`pe-export rewrite` on onnxruntime-genai's LongRoPE (Phi-3): two cache pairs, long and short factors,
chosen by an If on the total sequence length and read by GroupQueryAttention (committed fixture, see
tests/fixtures/genai/README.md; onnxruntime-genai is not needed to run these tests).

The reference is LongRoPE written here in float64 NumPy from transformers 5.23's formula
(`_compute_longrope_parameters`, `longrope_frequency_update`): for a call whose total length exceeds
original_max_position_embeddings, the long factors at every position, else the short ones; attention
factor sqrt(1 + ln(max / original) / ln(original)). It is checked on both sides of the switch.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import rewrite_models as rm  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "genai" / "phi3"
FIXTURE16 = FIXTURE.with_name("phi3-fp16")  # the builder's fp16 CUDA model: fp16 caches (ORT CPU runs it)
FIXTURE_DML = FIXTURE.with_name("phi3-dml")  # fp16 DirectML: one concatenated cache, RotaryEmbedding nodes
K_PROJ = "/model/layers.0/attn/k_proj/MatMul/output_0"  # DML's separate k projection (no packed QKV)
CONFIG = json.loads((FIXTURE / "config.json").read_text())
ROPE = CONFIG["rope_parameters"]
ORIGINAL, LAST = CONFIG["original_max_position_embeddings"], CONFIG["max_position_embeddings"]
R = 16
EPS32 = 2.0**-24
ROTATED_ULPS = 8  # float32 x * cos - x' * sin from exact tables, in units of max|x| (as test_rewrite_fused)
GAIN = 20.0  # the original's error at the table's end over the rewritten's (measured ~170 at 2048 positions)
WINDOWS = {  # name: positions of one call (a past of zeros before the first)
    "start": np.arange(0, 64),
    "short side of the switch": np.arange(ORIGINAL - 64, ORIGINAL),  # total = original: short factors
    "long side of the switch": np.arange(ORIGINAL, ORIGINAL + 64),
    "end": np.arange(LAST - 64, LAST),
}


def rotate64(k: np.ndarray, positions: np.ndarray, config: dict = CONFIG) -> np.ndarray:
    """k (B, H, S, R) rotated (halves) by `config`'s LongRoPE in float64, the factors chosen by the call's
    total length."""
    rope, original = config["rope_parameters"], config["original_max_position_embeddings"]
    total = int(positions[-1]) + 1
    ext = np.asarray(rope["long_factor"] if total > original else rope["short_factor"], np.float64)
    inv_freq = 1.0 / (ext * rope["rope_theta"] ** (np.arange(0, R, 2) / R))
    factor = np.sqrt(1 + np.log(config["max_position_embeddings"] / original) / np.log(original))
    angle = positions[:, None].astype(np.float64) * inv_freq
    c, s = np.cos(angle) * factor, np.sin(angle) * factor
    a, b = k[..., : R // 2].astype(np.float64), k[..., R // 2 :].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def copy_fixture(src: Path, folder: Path) -> Path:
    for f in src.iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    from pe_export.rewriter import rewrite

    folder = tmp_path_factory.mktemp("genai")
    copy_fixture(FIXTURE, folder)
    out = folder / "rewritten" / "model.onnx"
    out.parent.mkdir()
    result = rewrite(folder / "model.onnx", folder / "config.json", output=out)
    return folder, out, result


def test_both_branches_become_sites_and_the_switch_is_kept(rewritten):
    import onnx_ir as ir

    _, out, result = rewritten
    long, short = result.sites
    assert {s.rule for s in result.sites} == {"gqa_rotary"}
    assert (long.cos, long.seq_len, short.cos, short.seq_len) == (
        "cos_cache_large",
        ORIGINAL + 1,
        "cos_cache_small",
        ORIGINAL,
    )
    model = ir.load(out)
    [switch] = [n for n in model.graph if n.op_type == "If"]
    greater = switch.inputs[0].producer()
    threshold = greater.inputs[1].const_value or greater.inputs[1].producer().attributes["value"].value
    assert greater.op_type == "Greater" and int(threshold.numpy()) == ORIGINAL  # the graph's own condition
    branch_tables = {
        branch: [n.inputs[0].name for n in switch.attributes[branch].value] for branch in ("then_branch", "else_branch")
    }
    assert branch_tables == {"then_branch": long.tables, "else_branch": short.tables}
    rows = {name: model.graph.initializers[name].const_value.shape[0] for name in (long.tables[0], short.tables[0])}
    assert rows == {long.tables[0]: LAST, short.tables[0]: ORIGINAL}  # the short factors serve positions < original
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.inputs[7] is switch.outputs[0] and n.inputs[8] is switch.outputs[1] for n in gqa)


def test_rotated_keys_are_exact_on_both_sides_of_the_switch(rewritten):
    folder, out, _ = rewritten
    errs = {
        kind: {name: rm.genai_key_error(path, positions, rotate64)[0] for name, positions in WINDOWS.items()}
        for kind, path in (("original", folder / "model.onnx"), ("rewritten", out))
    }
    note = f"layer 0's rotated keys against float64 LongRoPE: {errs}"
    new, old = errs["rewritten"], errs["original"]
    assert max(new.values()) <= ROTATED_ULPS * EPS32, note
    assert new["end"] <= rm.WITHIN * max(new["start"], EPS32), note  # flat
    assert old["end"] >= GAIN * new["end"], note  # the check can fail: the builder's float32 caches drift
    # One-token decode at the last position, batch 2.
    last = np.arange(LAST - 1, LAST)
    original, _ = rm.genai_key_error(folder / "model.onnx", last, rotate64, batch=2)
    err, _ = rm.genai_key_error(out, last, rotate64, batch=2)
    assert err <= ROTATED_ULPS * EPS32 and original >= GAIN * err, (original, err)


def test_logits_at_short_positions_do_not_move(rewritten):
    folder, out, _ = rewritten
    positions = np.arange(16)
    (_, a), (_, b) = (rm.genai_key_error(p, positions, rotate64) for p in (folder / "model.onnx", out))
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def cli_report(model: Path, config: Path, folder: Path) -> dict:
    """`pe-export rewrite MODEL --config CONFIG -o FOLDER/cli.onnx --report FOLDER/report.json`: exit 0,
    the report."""
    from typer.testing import CliRunner

    from pe_export.cli.main import app

    report = folder / "report.json"
    args = ["rewrite", str(model), "--config", str(config), "-o", str(folder / "cli.onnx"), "--report", str(report)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(report.read_text())


def test_cli_checks_each_branch_against_its_side_of_the_switch(tmp_path):
    doc = cli_report(FIXTURE / "model.onnx", FIXTURE / "config.json", tmp_path)
    rows = doc["sites"]
    assert {row["verdict"] for row in rows} == {"pass"} and len(rows) == 4, rows  # 2 sites x 2 runtimes
    positions = {row["site"]: (min(row["positions"]), max(row["positions"])) for row in rows}
    assert positions == {0: (ORIGINAL, LAST - 1), 1: (0, ORIGINAL - 1)}
    for row in rows:  # the builder's float32 caches: off by more than the bound somewhere on each side
        assert max(row["original_error"]) > row["bound"] >= max(row["rewritten_error"]), row
    assert [w["verdict"] for w in doc["whole_model"]] == ["pass", "pass"]


def test_audit_names_both_branches(rewritten):
    from pe_export.rewriter import audit

    folder, out, _ = rewritten
    before = audit(folder / "model.onnx", folder / "config.json")
    assert before.verdict == "FAIL" and [(s.rows, s.context, s.verdict) for s in before.sites] == [
        (LAST, LAST, "FAIL"),
        (ORIGINAL, ORIGINAL, "FAIL"),  # the short caches serve positions < original: not a short cache
    ]
    after = audit(out, folder / "config.json")
    assert after.verdict == "pass", after.sites


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            {
                "original_max_position_embeddings": 64,
                "rope_parameters": {**ROPE, "original_max_position_embeddings": 64},
            },
            "original_max_position_embeddings: the graph switches to the long factors above 128, the config gives 64",
        ),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "scaling: the graph switches"),
        (
            {"rope_parameters": {**ROPE, "long_factor": [1.0] * 8}},
            "the long factors' caches 'cos_cache_large'",
        ),
    ],
)
def test_a_config_that_disagrees_with_either_branch_is_refused(edit, named, tmp_path):
    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, **edit}))
    with pytest.raises(BadInput, match="the config disagrees with the graph") as e:
        rewrite(FIXTURE / "model.onnx", config)
    assert named in str(e.value) and "\n" not in str(e.value), e.value


def test_op_ort_keeps_gqa_rotation_on_the_new_tables():
    from pe_export.rewriter import rewrite

    result = rewrite(FIXTURE / "model.onnx", FIXTURE / "config.json", op="ort")
    assert [(s.fused, s.rotations) for s in result.sites] == [("com.microsoft::GroupQueryAttention", 0)] * 2


FP16_ROTATED_ULPS = 8  # the fp16 rotation of fp16 k on fp16 tables, in units of 2^-11 max|k|


def test_fp16_caches_stay_fp16_and_the_rotation_stays_within_fp16_rounding(tmp_path):
    """The builder's fp16 model (CUDA; fp16 caches computed in float32 and rounded): the tables are rebuilt
    in float64 and rounded once to fp16; the whole CLI passes with the fp16 bounds."""
    import onnx_ir as ir

    from pe_export.rewriter import rewrite

    path = copy_fixture(FIXTURE16, tmp_path)
    out = tmp_path / "rewritten" / "model.onnx"
    out.parent.mkdir()
    result = rewrite(path, tmp_path / "config.json", output=out)
    assert [(s.dtype, s.seq_len) for s in result.sites] == [("fp16", ORIGINAL + 1), ("fp16", ORIGINAL)]
    model = ir.load(out)
    assert {model.graph.initializers[t].dtype for s in result.sites for t in s.tables} == {ir.DataType.FLOAT16}
    for name, positions in WINDOWS.items():
        err, _ = rm.genai_key_error(out, positions, rotate64)
        assert err <= FP16_ROTATED_ULPS * 2.0**-11, (name, err)
    doc = cli_report(path, tmp_path / "config.json", tmp_path)
    assert {row["verdict"] for row in doc["sites"]} == {"pass"} and len(doc["sites"]) == 4
    factor = np.sqrt(1 + np.log(LAST / ORIGINAL) / np.log(ORIGINAL))  # LongRoPE's attention factor
    assert all(row["bound"] == pytest.approx(2 * 2.0**-11 * factor) for row in doc["sites"])  # fp16's rounding
    assert [w["verdict"] for w in doc["whole_model"]] == ["pass", "pass"], doc["whole_model"]


def test_fp16_caches_of_another_theta_are_refused(tmp_path):
    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "rope_parameters": {**ROPE, "rope_theta": 500000.0}}))
    with pytest.raises(BadInput, match="the config disagrees with the graph") as e:
        rewrite(FIXTURE16 / "model.onnx", config)
    assert "theta" in str(e.value) and "cos_cache_large" in str(e.value), e.value


def test_dml_concatenated_cache_becomes_two_sites_and_keys_stay_within_fp16_rounding(tmp_path):
    """The builder's DirectML model: cos_cache (original + P, R/2) = [short rows; long rows], read by
    RotaryEmbedding at positions moved into the long rows when max(position) >= original."""
    import onnx_ir as ir

    from pe_export.rewriter import rewrite

    path = copy_fixture(FIXTURE_DML, tmp_path)
    out = tmp_path / "rewritten" / "model.onnx"
    out.parent.mkdir()
    result = rewrite(path, tmp_path / "config.json", output=out)
    sites = [(s.rule, s.cos, s.offset, s.seq_len, s.dtype) for s in result.sites]
    assert sites == [
        ("rotary_embedding_node", "cos_cache", ORIGINAL, ORIGINAL + 1, "fp16"),
        ("rotary_embedding_node", "cos_cache", 0, ORIGINAL, "fp16"),
    ]
    model = ir.load(out)
    rotary = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    concat = rotary[0].inputs[2].producer()
    assert len(rotary) == 4 and concat.op_type == "Concat" and all(n.inputs[2] is concat.outputs[0] for n in rotary)
    long, short = result.sites
    assert [v.name for v in concat.inputs] == [short.tables[0], long.tables[0]]  # [short rows; long rows]
    assert [v.const_value.shape[0] for v in concat.inputs] == [ORIGINAL, LAST]
    for name, positions in WINDOWS.items():
        for kind, model_path in (("original", path), ("rewritten", out)):
            err, _ = rm.genai_key_error(model_path, positions, rotate64, K_PROJ, key_start=0)
            assert err <= FP16_ROTATED_ULPS * 2.0**-11, (kind, name, err)
    doc = cli_report(path, tmp_path / "config.json", tmp_path)
    assert {row["verdict"] for row in doc["sites"]} == {"pass"} and len(doc["sites"]) == 4
    assert [w["verdict"] for w in doc["whole_model"]] == ["pass", "pass"], doc["whole_model"]


def test_dml_cache_of_other_long_factors_is_refused_and_unshifted_positions_are_no_site(tmp_path):
    import onnx

    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "rope_parameters": {**ROPE, "long_factor": [1.0] * 8}}))
    with pytest.raises(BadInput, match="the config disagrees with the graph") as e:
        rewrite(FIXTURE_DML / "model.onnx", config)
    assert f"a cache of {ORIGINAL} short rows then {LAST} long ones" in str(e.value), e.value
    # The same cache read at positions that are not moved into its long rows: not genai's form, no site.
    model = onnx.load(FIXTURE_DML / "model.onnx")
    for node in model.graph.node:
        if node.op_type == "RotaryEmbedding":
            node.input[1] = "position_ids"
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    with pytest.raises(BadInput, match="no RoPE site found"):
        rewrite(tmp_path / "model.onnx", FIXTURE_DML / "config.json")
    # Positions moved into the long rows at another length than the cache's split: refused, naming it.
    model = onnx.load(FIXTURE_DML / "model.onnx")
    for node in model.graph.node:
        if node.op_type == "GreaterOrEqual":
            shifted = onnx.helper.make_node("Constant", [], ["at_64"], value=onnx.helper.make_tensor("", 7, [], [64]))
            node.input[1] = "at_64"
    model.graph.node.insert(0, shifted)
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    with pytest.raises(BadInput, match="the config disagrees with the graph") as e:
        rewrite(tmp_path / "model.onnx", FIXTURE_DML / "config.json")
    assert f"moves positions by {ORIGINAL} into the long rows" in str(e.value) and ">= 64" in str(e.value), e.value


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxruntime_genai") is None,
    reason="onnxruntime-genai is not installed (pip install -e '.[genai]')",
)
def test_builder_phi3_at_131072_positions_and_genai_runtime(tmp_path):
    """The builder run here on transformers' Phi-3 shape (original 4096, 131072 positions): keys exact on
    both sides of the switch and at the end, and the rewritten folder generates in onnxruntime-genai's own
    runtime the tokens the original does (greedy, positions 0-39)."""
    import onnxruntime_genai as og

    from pe_export.rewriter import rewrite

    model, _ = rm.build(rm.BY_NAME["phi3-longrope"])
    path = rm.genai_build(model, tmp_path)
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    original, last = config["original_max_position_embeddings"], config["max_position_embeddings"]
    out = tmp_path / "rewritten" / "model.onnx"
    out.parent.mkdir()
    rewrite(path, tmp_path / "checkpoint" / "config.json", output=out)
    rotate = lambda k, positions: rotate64(k, positions, config)  # noqa: E731
    windows = [np.arange(original - 64, original), np.arange(original, original + 64), np.arange(last - 64, last)]
    errs = {
        kind: [rm.genai_key_error(p, w, rotate)[0] for w in windows]
        for kind, p in (("original", path), ("rewritten", out))
    }
    assert max(errs["rewritten"]) <= ROTATED_ULPS * EPS32 and errs["original"][-1] >= 1000 * errs["rewritten"][-1], errs
    # onnxruntime-genai's runtime on the rewritten folder (its genai_config.json and tokenizer copied).
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(path.with_name(name), out.with_name(name))
    tokens = {}
    for folder in (path.parent, out.parent):
        genai_config = json.loads((folder / "genai_config.json").read_text())
        genai_config["model"]["eos_token_id"] = 2  # the tiny vocabulary's (the checkpoint says Phi-3's 32000)
        (folder / "genai_config.json").write_text(json.dumps(genai_config))
        m = og.Model(str(folder))
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=40, do_sample=False)
        generator = og.Generator(m, params)
        generator.append_tokens(np.array([[5, 6, 7, 8, 9, 10]], np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        tokens[folder.name] = list(generator.get_sequence(0))
    assert tokens[path.parent.name] == tokens[out.parent.name] and len(tokens[out.parent.name]) == 40, tokens


def test_a_seq_that_never_reaches_the_long_factors_exits_2_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from pe_export.cli.main import app

    out = tmp_path / "model.onnx"
    args = ["rewrite", str(FIXTURE / "model.onnx"), "--config", str(FIXTURE / "config.json"), "-o", str(out)]
    r = CliRunner().invoke(app, [*args, "--seq", str(ORIGINAL // 2)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"pass --seq above {ORIGINAL}" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fixture", [FIXTURE, FIXTURE16, FIXTURE_DML], ids=lambda f: f.name)
def test_the_large_model_route_verifies_each_fixture_by_path(fixture, monkeypatch, tmp_path):
    """With the threshold forced down (every model "large"), the checks run by path on one graph holding
    the original and the rewritten (`rewriter.pair`): the If and the concatenated caches go through it,
    and the rows are those of the in-memory route."""
    from pe_export.rewriter import copies, rewrite_and_verify

    path = copy_fixture(fixture, tmp_path)
    small = rewrite_and_verify(path, tmp_path / "config.json", output=tmp_path / "small.onnx")
    monkeypatch.setattr("pe_export.files.EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(copies, "MAX_PROTO", 0)
    large = rewrite_and_verify(path, tmp_path / "config.json", output=tmp_path / "large.onnx")
    assert large.verdict == small.verdict == "pass", (large.whole_rows, large.site_rows)
    assert [(r.runtime, r.verdict) for r in large.whole_rows] == [(r.runtime, r.verdict) for r in small.whole_rows]
    for a, b in zip(large.site_rows, small.site_rows):
        assert (a.site, a.runtime, a.positions, a.rewritten_error) == (
            b.site,
            b.runtime,
            b.positions,
            b.rewritten_error,
        )
