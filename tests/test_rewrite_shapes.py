"""`pe-export rewrite` on the shapes issue 19 (part 4) found refused: interleaved pairs under --op
onnx|ort|decomposed (GLM, partial rotary 0.5; DeepSeek-V3, `rope_interleave`, MLA, YaRN x40), and Cohere's
cos/sin repeated per pair.

Tiny transformers 5.23 models with random weights (nothing downloaded), exported by torch.onnx.export. The
expected values are independent of the rewriter: each rotated q/k of the rewritten model against
pe-export's float64 rotation (`custom_ops.rotation.apply_reference`) of the same run's q/k, at positions
to the end of the table; cos/sin against float64 tables from the formula; the whole model against the
original's logits at short positions. Default: each family with --op onnx (and Cohere's cos/sin with
--op tables); the other ops are slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import rewrite_models as rm  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

CONTEXT = 2048
ONE_LAYER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)

SHAPES = {
    "glm": rm.Family(
        "glm",
        "glm",
        dict(
            max_position_embeddings=CONTEXT,
            head_dim=16,
            pad_token_id=0,
            eos_token_id=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        last=CONTEXT,
        sizes=dict(ONE_LAYER, num_key_value_heads=2),
    ),
    "deepseek-v3": rm.Family(
        "deepseek-v3",
        "deepseek_v3",
        dict(
            max_position_embeddings=CONTEXT,
            rope_interleave=True,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,  # every layer dense: the MoE's grouped_mm does not export
            moe_intermediate_size=32,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 0.707,  # attention factor != 1: the tables carry it
            },
        ),
        last=CONTEXT,
        sizes=dict(ONE_LAYER, num_key_value_heads=4),
    ),
    "cohere": rm.Family(
        "cohere",
        "cohere",
        dict(
            max_position_embeddings=CONTEXT,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        last=CONTEXT,
        sizes=dict(ONE_LAYER, num_key_value_heads=2),
    ),
}
# the pairing each family's rotation rule records: rotate_pairs_repeated, rotate_pairs_to_halves
PAIRING = {"glm": "interleaved", "cohere": "interleaved", "deepseek-v3": "interleaved_to_half"}
DEFAULT = {("glm", "onnx"), ("deepseek-v3", "onnx"), ("cohere", "onnx"), ("cohere", "tables")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model, cfg = rm.build(SHAPES[name])
            cache[name] = (rm.export(model, folder / "model.onnx"), rm.save_config(cfg, folder))
        return cache[name]

    return get


def cases():
    for name in SHAPES:
        for op in ("tables", "onnx", "ort", "decomposed"):
            slow = (name, op) not in DEFAULT
            yield pytest.param(name, op, id=f"{name}-{op}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("name,op", list(cases()))
def test_shape_rewrites_and_verifies(name, op, exported, tmp_path):
    from pe_export.cli.main import app

    path, config = exported(name)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = CliRunner().invoke(
        app,
        ["rewrite", str(path), "--config", str(config), "--op", op, "-o", str(out), "--report", str(report)]
        + (["--runtimes", "ort-cpu"] if (name, op) in DEFAULT else []),
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    (site,) = doc["rewrite"]["sites"]
    rows = doc["sites"]
    assert rows and all(row["verdict"] == "pass" for row in rows), rows
    assert all(row["positions"][-1] == CONTEXT - 1 for row in rows)
    assert all(w["verdict"] == "pass" for w in doc["whole_model"]), doc["whole_model"]
    if op == "tables":
        assert site["rotations"] == 0 and any(row["what"] == "cos/sin" for row in rows)
        if name == "cohere":
            assert site["rule"] == "cos_sin_repeated" and site["width"] == "repeated"
    else:
        assert site["rotations"] == 2, site  # q and k of the one layer
        assert {rot["pairing"] for rot in site["rotated"]} == {PAIRING[name]}
        rotated = [row for row in rows if row["what"] == "rotated q/k"]
        assert rotated and all(row["rewritten_error"][-1] < row["original_error"][-1] for row in rotated), rotated
        import onnx

        types = {n.op_type for n in onnx.load(out).graph.node}
        assert op == "decomposed" or "RotaryEmbedding" in types
