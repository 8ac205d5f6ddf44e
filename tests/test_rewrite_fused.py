"""`pe-export rewrite` on graphs whose RoPE is already fused: RotaryEmbedding of either domain and
GroupQueryAttention with do_rotary, reading float32 cos/sin caches (rules `rotary_embedding_node`,
`gqa_rotary`, `fused_rotary`).

Default set: one small graph per fused node (`fused_models.FUSED`, caches built as onnxruntime-genai
builds them), every --op, against the float64 rotation written out from the formula at the table's last
positions. `slow`: whole models, onnxscript's `optimize_for_ort` of a transformers export and
onnxruntime-genai's model builder on a local tiny checkpoint (skipped when it is not installed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fused_models as fm  # noqa: E402

pytest.importorskip("onnxruntime")

OPS = ("tables", "onnx", "ort", "decomposed")
EPS32 = 2.0**-24
ROTATED_ULPS = 8  # float32 x * cos - x' * sin from exact tables: two products and a sum, in units of max|x|
GAIN = 100.0  # the original caches' error at the table's end, as a multiple of the rewritten's (measured: ~1e4)
# What each --op leaves reading the tables: (domain, op type) of the fused node, None: no fused RoPE node.
AFTER = {
    "tables": None,
    "ort": ("com.microsoft", "RotaryEmbedding"),
    "onnx": ("", "RotaryEmbedding"),
    "decomposed": None,
}


def fused_params():
    out = []
    for kind in fm.FUSED:
        for computed in (False, True):
            if computed and kind.endswith("GroupQueryAttention"):
                # GQA has no position_ids input to compute a cache from here (the slow onnxscript test has one)
                continue
            for op in OPS:
                out.append(pytest.param(kind, computed, op, id=f"{kind}-{'computed' if computed else 'constant'}-{op}"))
    return out


def errors(kind: str, original: bytes, rewritten: bytes, rope: fm.Rope, positions: np.ndarray) -> dict:
    y_o, x = fm.rotated(kind, original, positions)
    y_n, _ = fm.rotated(kind, rewritten, positions)
    truth = fm.rotate64(x, positions, rope.theta, rope.factor)
    scale = float(np.abs(x).max())
    return {
        "original": float(np.abs(y_o - truth).max()) / scale,
        "rewritten": float(np.abs(y_n - truth).max()) / scale,
        "apart": float(np.abs(y_n.astype(np.float64) - y_o).max()) / scale,
    }


@pytest.mark.parametrize("kind,computed,op", fused_params())
def test_fused_caches_become_exact(kind, computed, op, tmp_path):
    from pe_export.rewriter import rewrite

    rope = fm.Rope(computed=computed)
    model = fm.FUSED[kind](rope)
    out = tmp_path / "rewritten.onnx"
    result = rewrite(model, fm.config(tmp_path, rope), op=op, output=out)
    [site] = result.sites
    assert site.fused == kind and site.width == "table"
    assert site.inv_freq == ("inv_freq" if computed else "cos_cache")
    rewritten = onnx.load(out)
    nodes = {(n.domain, n.op_type) for n in rewritten.graph.node}
    if kind.endswith("GroupQueryAttention"):  # GQA keeps its own rotation under every --op
        assert ("com.microsoft", "GroupQueryAttention") in nodes and site.rotations == 0
    else:
        want = AFTER[op] or (
            ("com.microsoft", "RotaryEmbedding") if kind.startswith("com.") else ("", "RotaryEmbedding")
        )
        assert {n for n in nodes if n[1] == "RotaryEmbedding"} == ({want} if op != "decomposed" else set()), nodes
        assert site.rotations == (0 if op == "tables" else 1)
    assert not any(n.op_type in ("Cos", "Sin") for n in rewritten.graph.node)  # the computed caches are gone
    assert {t.name for t in rewritten.graph.initializer} >= set(site.tables)
    original = model.SerializeToString()
    end = errors(kind, original, out.read_bytes(), rope, np.arange(rope.rows - 8, rope.rows))
    start = errors(kind, original, out.read_bytes(), rope, np.arange(8))
    note = f"{kind} --op {op}: start {start}, end {end}"
    assert end["rewritten"] <= ROTATED_ULPS * EPS32 and start["rewritten"] <= ROTATED_ULPS * EPS32, note
    assert end["original"] >= GAIN * end["rewritten"], note
    assert start["apart"] <= 2 * ROTATED_ULPS * EPS32, note  # the same model at short positions


def bad_cases():
    """name -> (graph's Rope, config's rope_parameters or config edits, the parameter named)."""
    return {
        "theta": (fm.Rope(), {"rope_theta": 10001.0}, "theta"),
        "rotary dim": (fm.Rope(), {"head_dim": 32}, "rotary dim"),
        "attention factor": (fm.Rope(factor=1.25), {}, "attention factor"),
        "pairing": (fm.Rope(interleaved=1), {}, "pairing"),
        "scaling": (fm.Rope(), {"rope_type": "linear", "factor": 2.0}, "scaling"),
    }


@pytest.mark.parametrize("kind", list(fm.FUSED))
@pytest.mark.parametrize("case", list(bad_cases()))
def test_caches_that_disagree_with_the_config_are_refused_naming_the_parameter(kind, case, tmp_path):
    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    rope, edits, named = bad_cases()[case]
    path = fm.config(tmp_path, rope)
    cfg = json.loads(path.read_text())
    for k, v in edits.items():
        (cfg["rope_parameters"] if k.startswith("rope_") or k == "factor" else cfg)[k] = v
    path.write_text(json.dumps(cfg))
    model = fm.FUSED[kind](rope)
    before = model.SerializeToString()
    with pytest.raises(BadInput, match=rf"config disagrees with the graph: {named}") as e:
        rewrite(model, path)
    assert "cos_cache" in str(e.value)  # the site is named
    assert model.SerializeToString() == before


def test_computed_cache_with_a_wrong_theta_is_refused(tmp_path):
    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    rope = fm.Rope(computed=True)
    path = fm.config(tmp_path, rope)
    cfg = json.loads(path.read_text())
    cfg["rope_parameters"]["rope_theta"] = 20000.0
    path.write_text(json.dumps(cfg))
    with pytest.raises(
        BadInput, match=r"theta: the graph's inv_freq gives theta 10000, the config gives 20000 \(site 'inv_freq'"
    ):
        rewrite(fm.FUSED["com.microsoft::RotaryEmbedding"](rope), path)


def test_conversions_that_would_change_the_arithmetic_are_refused(tmp_path):
    from pe_export.errors import BadInput
    from pe_export.rewriter import rewrite

    rope = fm.Rope()
    model = fm.FUSED["com.microsoft::RotaryEmbedding"](rope)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("scale", 0.5))
    with pytest.raises(BadInput, match="scale=0.5"):
        rewrite(model, fm.config(tmp_path, rope), op="onnx")
    assert rewrite(model, fm.config(tmp_path, rope), op="ort").sites[0].rotations == 1  # already the target: kept


def test_cli_rewrites_a_fused_graph_and_verifies_the_tables(tmp_path):
    from typer.testing import CliRunner

    from pe_export.cli.main import app

    rope = fm.Rope()
    src = tmp_path / "fused.onnx"
    onnx.save(fm.FUSED["com.microsoft::RotaryEmbedding"](rope), src)
    report = tmp_path / "report.json"
    r = CliRunner().invoke(
        app,
        [
            "rewrite",
            str(src),
            "--config",
            str(fm.config(tmp_path, rope)),
            "-o",
            str(tmp_path / "out.onnx"),
            "--report",
            str(report),
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert {row["runtime"] for row in doc["sites"]} == {
        "ort-cpu",
        "ort-cpu-noopt",
    }  # the default runtimes, one row each
    for row in doc["sites"]:
        assert row["verdict"] == "pass" and row["positions"][-1] == rope.rows - 1 and row["what"] == "caches"
        assert row["rewritten_error"][-1] <= row["bound"] < row["original_error"][-1]
    assert doc["whole_model"][0]["verdict"] == "pass"
    assert doc["rewrite"]["sites"][0]["fused"] == "com.microsoft::RotaryEmbedding"


def test_cli_verifies_a_model_whose_weights_are_external_data(tmp_path):
    """The verification copies are handed to the runtimes as bytes: weights kept in a .data file beside the
    model are read into them (ORT given bytes has no folder to look in: "escapes working directory")."""
    from typer.testing import CliRunner

    from pe_export.cli.main import app

    rope = fm.Rope()
    src = tmp_path / "fused.onnx"
    onnx.save(
        fm.FUSED["com.microsoft::RotaryEmbedding"](rope),
        src,
        save_as_external_data=True,
        location="fused.onnx.data",
        size_threshold=0,
    )
    out, report = tmp_path / "out" / "out.onnx", tmp_path / "out" / "report.json"
    out.parent.mkdir()
    r = CliRunner().invoke(
        app, ["rewrite", str(src), "--config", str(fm.config(tmp_path, rope)), "-o", str(out), "--report", str(report)]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert [w["verdict"] for w in doc["whole_model"]] == ["pass", "pass"], doc["whole_model"]


def test_past_key_values_take_their_symbolic_head_axes_from_the_config():
    """onnxruntime-genai's builder names a past key/value (batch_size, 2, past_sequence_length, kv_cache_dim):
    the head size must come from the config (a size of 0 there is refused by GroupQueryAttention)."""
    import onnx_ir as ir

    from pe_export.rewriter.checks import cache_dims_of, feeds

    past = ir.Value(
        name="past_key_values.0.key",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(["batch_size", 2, "past_sequence_length", "kv_cache_dim"]),
    )
    ids = ir.Value(
        name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch_size", "sequence_length"])
    )
    model = ir.Model(ir.Graph([ids, past], [], nodes=[]), ir_version=10)
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
    assert cache_dims_of(config) == {1: 2, 3: 16}
    got = feeds(model, np.arange(5), batch=3, cache_dims=cache_dims_of(config))
    assert got["past_key_values.0.key"].shape == (3, 2, 0, 16) and got["input_ids"].shape == (3, 5)
    assert cache_dims_of({"num_attention_heads": 4, "head_dim": 32}) == {1: 4, 3: 32}


# --- whole models (slow) ----------------------------------------------------------------------------

import rewrite_models as rm  # noqa: E402


@pytest.fixture(scope="session")
def fused_llama(tmp_path_factory):
    """onnxscript's ORT fusions of the tiny Llama with transformers 4.x's rotary forward, exported once:
    {"rotary": com.microsoft::RotaryEmbedding, "gqa": GroupQueryAttention(do_rotary)} model paths, the
    config, the float64 oracle."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("fused-llama")
    model, cfg = rm.build(rm.BY_NAME["llama"])
    rm.matmul_form_rotary(model)
    path = rm.export(model, folder / "model.onnx")
    paths = {kind: rm.ort_fused(path, folder / f"{kind}.onnx", gqa=kind == "gqa") for kind in ("rotary", "gqa")}
    return paths, rm.save_config(cfg, folder), rm.oracle(model, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_onnxscript_fused_rotary_embedding_logits_error_is_position_independent(op, fused_llama, tmp_path):
    from pe_export.rewriter import rewrite

    paths, config, m64 = fused_llama
    out = tmp_path / "rewritten.onnx"
    result = rewrite(paths["rotary"], config, op=op, output=out)
    [site] = result.sites
    assert (
        site.rule == "rotary_embedding_node"
        and site.fused == "com.microsoft::RotaryEmbedding"
        and site.rotations == (0 if op == "tables" else 4)
    )
    e = rm.errors(paths["rotary"], out, m64, rm.BY_NAME["llama"].last)
    note = f"onnxscript-fused llama --op {op}: {json.dumps({k: f'{v:.2e}' for k, v in e.items()})}"
    assert e["rewritten_end"] <= rm.WITHIN * e["rewritten_start"], note
    assert e["original_end"] >= rm.GROWS * e["original_start"], note
    assert e["rewritten_end"] * rm.GROWS <= e["original_end"], note


@pytest.mark.slow
@pytest.mark.parametrize("op", ["tables", "ort"])
def test_onnxscript_gqa_caches_become_exact_and_the_model_is_unchanged_at_short_positions(op, fused_llama, tmp_path):
    import onnx_ir as ir

    from pe_export.rewriter import cache_checks as verify_caches
    from pe_export.rewriter import checks as verify
    from pe_export.rewriter import rewrite

    paths, config, _ = fused_llama
    out = tmp_path / "rewritten.onnx"
    result = rewrite(paths["gqa"], config, op=op, output=out)
    [site] = result.sites
    assert site.rule == "gqa_rotary" and site.fused == "com.microsoft::GroupQueryAttention" and site.rotations == 0
    original, rewritten = ir.load(paths["gqa"]), ir.load(out)
    assert (
        sum(n.op_type == "GroupQueryAttention" and n.attributes["do_rotary"].value == 1 for n in rewritten.graph) == 2
    )
    [row] = verify_caches.check_caches(original, rewritten, result.sites, ("ort-cpu",))
    note = (
        f"--op {op}: position {row.positions[-1]}: original {row.original_error[-1]:.2e}, rewritten "
        f"{row.rewritten_error[-1]:.2e}"
    )
    assert row.verdict == "pass" and row.original_error[-1] >= GAIN * row.rewritten_error[-1], note
    [whole] = verify.check_whole(original, rewritten)  # GQA here runs from position 0 (no past inputs)
    assert whole.verdict == "pass", whole


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxruntime_genai") is None,
    reason="onnxruntime-genai is not installed (pip install -e '.[genai]')",
)
def test_onnxruntime_genai_model_builder_caches_become_exact(tmp_path):
    from pe_export.rewriter import rewrite

    family = rm.BY_NAME["llama"]
    model, cfg = rm.build(family)
    path = rm.genai_build(model, tmp_path)
    out = tmp_path / "rewritten" / "model.onnx"
    out.parent.mkdir()
    result = rewrite(path, tmp_path / "checkpoint" / "config.json", output=out)
    [site] = result.sites
    assert site.rule == "gqa_rotary" and site.inv_freq == "cos_cache" and site.replaced == ["sin_cache"]
    assert (out.parent / "model.onnx.data").is_file()  # external data in, external data out
    qkv = "/model/layers.0/attn/qkv_proj/MatMul/output_0"
    theta = cfg.rope_parameters["rope_theta"]
    rotate = lambda k, positions: fm.rotate64(k, positions, theta)  # noqa: E731
    end = np.arange(family.last - 64, family.last)
    errs = {kind: rm.genai_key_error(p, end, rotate, qkv)[0] for kind, p in (("original", path), ("rewritten", out))}
    note = f"genai llama, rotated keys at positions {end[0]}-{end[-1]}: {errs}"
    assert errs["rewritten"] <= ROTATED_ULPS * EPS32 and errs["original"] >= GAIN * errs["rewritten"], note
    short = np.arange(16)
    (_, a), (_, b) = rm.genai_key_error(path, short, rotate, qkv), rm.genai_key_error(out, short, rotate, qkv)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max()), "logits at positions 0-15 moved"
    # The CLI on the built model: caches checked, the whole model (no position_ids; past key/values whose
    # head axis is symbolic) compared at positions 0-15.
    from typer.testing import CliRunner

    from pe_export.cli.main import app

    report = tmp_path / "rewritten" / "report.json"
    r = CliRunner().invoke(
        app,
        [
            "rewrite",
            str(path),
            "--config",
            str(tmp_path / "checkpoint" / "config.json"),
            "-o",
            str(out.parent / "cli.onnx"),
            "--report",
            str(report),
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert {row["verdict"] for row in doc["sites"]} == {"pass"} and [w["verdict"] for w in doc["whole_model"]] == [
        "pass",
        "pass",
    ], doc
    # --op ort: GQA keeps its own rotation on the new tables, and says so.
    result = rewrite(path, tmp_path / "checkpoint" / "config.json", op="ort")
    assert result.sites[0].fused == "com.microsoft::GroupQueryAttention" and result.sites[0].rotations == 0
