"""`pe-export rewrite` on the shapes issue 19 (part 4) found refused: interleaved pairs under --op
onnx|ort|decomposed (GLM, partial rotary 0.5; DeepSeek-V3, `rope_interleave`, MLA, YaRN x40), Cohere's
cos/sin repeated per pair, and M-RoPE text exports (Qwen2-VL, Qwen3-VL) with every --op.

Tiny transformers 5.23 models with random weights (nothing downloaded), exported by torch.onnx.export. The
expected values are independent of the rewriter: each rotated q/k of the rewritten model against
pe-export's float64 rotation (`custom_ops.rotation.apply_reference`) of the same run's q/k, at positions
to the end of the table; cos/sin against float64 tables from the formula; the whole model against the
original's logits at short positions; M-RoPE's recomposed cos/sin against a float64 form of transformers'
`recomposition_frequencies` (written here: branch `mrope` builds the encoding); the M-RoPE logits against
the same transformers model in float64 (its own `recomposition_frequencies` on float64 cos/sin), with three
position rows that differ. Default: DeepSeek-V3 and Cohere with --op onnx, Qwen2-VL and Qwen3-VL with every
op; GLM and the other ops of the rest are slow.
"""

from __future__ import annotations

import json
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
# The default set pays one export per family (~20 s each on 2 cores): DeepSeek-V3 and Cohere cover the three
# new rules' --op path (Cohere's cos/sin rule included); GLM (rotate_pairs_repeated's other source) is slow.
DEFAULT = {("deepseek-v3", "onnx"), ("cohere", "onnx")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model.onnx, config.json, the model, its config): a SHAPES family, or an M-RoPE model (MROPE)
    whose text path takes (3, B, S) positions."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model, cfg = build_mrope(name) if name in MROPE else rm.build(SHAPES[name])
            path = rm.export(model, folder / "model.onnx", mrope=name in MROPE)
            cache[name] = (path, rm.save_config(cfg, folder), model, cfg)
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

    path, config, _, _ = exported(name)
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


# ------------------------------------------------------------------------------------------------
# M-RoPE text exports: Cos/Sin of (3, B, S, R/2) angles, sections selected per rotary dim after. Qwen2-VL's
# chunked sections and Qwen3-VL's interleaved ones (a section whose interleaved pair counts are [4, 2, 2], as
# Qwen3-VL's own [24, 20, 20] are at R/2 = 64). Every case is in the default set: the two (3, B, S) exports
# take ~7 s each, a case ~1 s after them.

MROPE_SECTION = [2, 3, 3]  # of R/2 = 8
MROPE = {"qwen2-vl": (MROPE_SECTION, False), "qwen3-vl": ([4, 2, 2], True)}
MROPE_THETA = 1000000.0
MROPE_CONTEXT = 32768  # the float32 angles' error at the end: 15x the start's in the logits (2.7e-6 at 2048: 12x)
WINDOW = 64


def recomposition_frequencies(freq: np.ndarray, mrope_section: list[int]) -> np.ndarray:
    """float64 form of transformers 5.23 `Qwen2VLRotaryEmbedding.recomposition_frequencies`:
    (3, B, S, R/2) -> (B, S, R), section i of the rotary dims read from row i % 3 (t, h, w), then [f, f]."""
    bounds = np.cumsum([0, *mrope_section])
    freq = np.concatenate([freq[i % 3, ..., a:b] for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], -1)
    return np.concatenate([freq, freq], axis=-1)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    """(model.onnx, config.json, the model) of a tiny Qwen2-VL, its text path exported with (B, S) positions
    (the graph expands them to three equal rows)."""
    model, cfg = build_mrope("qwen2-vl", CONTEXT)
    folder = tmp_path_factory.mktemp("qwen2-vl")
    return rm.export(model, folder / "model.onnx"), rm.save_config(cfg, folder), model


def recomposed(model_path: Path, site_value: str) -> str:
    """The name of the (B, S, R) Concat(f, f) that the section selection after `site_value` ends in."""
    graph = onnx.load(model_path).graph
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    frontier, seen = [site_value], set()
    while frontier:
        value = frontier.pop()
        for node in users.get(value, []):
            if node.op_type == "Concat" and len(node.input) == 2 and node.input[0] == node.input[1]:
                return node.output[0]
            if node.output[0] not in seen:
                seen.add(node.output[0])
                frontier.extend(node.output)
    raise AssertionError(f"no Concat(f, f) after {site_value}")


def test_qwen2_vl_text_export_rewrites_and_its_sections_match_float64(qwen2_vl, tmp_path):
    """The rewritten graph's recomposed cos/sin (after the section selection it kept) against
    `recomposition_frequencies` of float64 cos/sin at positions to the end of the context."""
    import onnxruntime as ort

    from pe_export.cli.main import app
    from pe_export.rewriter.checks import spread_positions, with_outputs

    path, config, _ = qwen2_vl
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = CliRunner().invoke(
        app,
        [
            "rewrite",
            str(path),
            "--config",
            str(config),
            "-o",
            str(out),
            "--report",
            str(report),
            "--runtimes",
            "ort-cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    (site,) = doc["rewrite"]["sites"]
    assert site["rule"] == "cos_sin_mul_half" and all(row["verdict"] == "pass" for row in doc["sites"])

    positions = spread_positions(CONTEXT)
    inv_freq = 1.0 / 1000000.0 ** (np.arange(0, 16, 2, dtype=np.float64) / 16)  # (R/2,)
    angles = np.broadcast_to(positions[None, None, :, None] * inv_freq, (3, 1, positions.size, 8))  # (3, B, S, R/2)
    want = {"cos": recomposition_frequencies(np.cos(angles), MROPE_SECTION)[0]}  # (S, R)
    want["sin"] = recomposition_frequencies(np.sin(angles), MROPE_SECTION)[0]
    errors = {}
    for label, model in (("original", path), ("rewritten", out)):
        import onnx_ir as ir

        names = [recomposed(model, site["cos"]), recomposed(model, site["sin"])]
        data, outputs, _ = with_outputs(ir.load(model), names)
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        assert sess.get_providers()[0] == "CPUExecutionProvider"
        feed = {"input_ids": np.zeros((1, positions.size), np.int64), "position_ids": positions[None]}
        got = dict(zip(outputs, sess.run(None, feed)))
        errors[label] = max(
            float(np.abs(got[n].reshape(-1, positions.size, 16)[0] - want[k]).max()) for n, k in zip(names, want)
        )
    bound = doc["sites"][0]["bound"]
    assert errors["rewritten"] <= bound < errors["original"], errors


# M-RoPE text exports whose position_ids input is (3, B, S), as a vision-language model's decoder takes
# them, rewritten with every --op: the rotations read per-token rows of the float64 tables
# (pe_export.rewriter.mrope_rows).


def components(section: list[int], interleaved: bool) -> np.ndarray:
    """(R/2,) the row (0 t, 1 h, 2 w) of each rotary pair, from transformers 5.23's two
    `recomposition_frequencies` (Qwen2-VL: section i from row i % 3; Qwen3-VL: h at 1::3 up to 3h, w at
    2::3 up to 3w)."""
    half = sum(section)
    if not interleaved:
        return np.concatenate([np.full(n, i % 3) for i, n in enumerate(section)])
    rows = np.zeros(half, np.int64)
    rows[1 : 3 * section[1] : 3], rows[2 : 3 * section[2] : 3] = 1, 2
    return rows


def build_mrope(name: str, context: int = MROPE_CONTEXT):
    """(model float32 eval, config) of a tiny Qwen2-VL or Qwen3-VL, q/k scaled by rm.QK_SCALE."""
    import torch
    import transformers

    section, interleaved = MROPE[name]
    text = dict(
        vocab_size=rm.VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": MROPE_THETA, "mrope_section": section},
    )
    if interleaved:
        text["rope_parameters"]["mrope_interleaved"] = True  # Qwen3-VL checkpoints' key (pe-export's reader)
        vision = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, deepstack_visual_indexes=[])
        config, model = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
        config, model = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    cfg = config(text_config=text, vision_config=vision)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model(cfg).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "q_proj.weight" in key or "k_proj.weight" in key:
                param.mul_(rm.QK_SCALE)
    return model, cfg


def float64_mrope(model, cfg):
    """The same model in float64, its rotary module computing cos/sin in float64 (angles from a float64
    inv_freq) and recomposing them with transformers' own `recomposition_frequencies`."""
    import copy

    import torch

    m64 = copy.deepcopy(model).double()
    rotary = m64.model.language_model.rotary_emb
    dim = cfg.text_config.head_dim
    inv_freq = torch.from_numpy(1.0 / MROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # (R/2,)

    def forward(x, position_ids):
        freqs = position_ids.expand(3, -1, -1)[..., None].double() * inv_freq  # (3, B, S, R/2)
        cos, sin = (rotary.recomposition_frequencies(t) for t in (freqs.cos(), freqs.sin()))  # (B, S, R)
        return cos.to(x.dtype), sin.to(x.dtype)

    rotary.forward = forward
    return m64


def vision_positions(first: int) -> np.ndarray:
    """(3, 2, WINDOW) positions in [first, first + WINDOW): three rows that differ, and differ per batch row."""
    w = first + np.arange(WINDOW)
    return np.stack([np.stack([w, w[::-1], np.roll(w, 1)]), np.stack([w[::-1], np.roll(w, 7), w])], axis=1)


@pytest.mark.parametrize("op", ["tables", "onnx", "ort", "decomposed"])
@pytest.mark.parametrize("name", list(MROPE))
def test_mrope_text_export_with_3d_positions_rewrites_with_every_op(name, op, exported, tmp_path):
    """Each --op on a (3, B, S) text export: every site row and the whole model pass on the default
    runtimes (which feed three rows that differ); the logits against transformers' model in float64, at
    positions whose three rows differ (batch 2), are as good at the end of the context as at its start,
    and the original's are not."""
    import torch

    from pe_export.cli.main import app

    path, config, model, cfg = exported(name)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    args = ["rewrite", str(path), "--config", str(config), "--op", op, "-o", str(out), "--report", str(report)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    (site,) = doc["rewrite"]["sites"]
    rows = doc["sites"]
    assert rows and all(row["verdict"] == "pass" for row in rows), rows
    assert {row["runtime"] for row in rows} == {"ort-cpu", "ort-cpu-noopt"}
    assert all(w["verdict"] == "pass" for w in doc["whole_model"]) and len(doc["whole_model"]) == 2, doc
    types = {(n.domain or "", n.op_type) for n in onnx.load(out).graph.node}
    assert not {t for _, t in types} & {"Cos", "Sin"}, types  # no float32 angles left
    if op == "tables":
        assert site["rotations"] == 0 and site["sections"] == []
    else:
        section, interleaved = MROPE[name]
        half = sum(section)
        want = components(section, interleaved) * half + np.arange(half)  # c * R/2 + k, k = j
        assert site["rotations"] == 2 and site["sections"] == want.tolist(), site
        assert any(row["what"] == "rotated q/k" for row in rows)
        rotary = {domain for domain, t in types if t == "RotaryEmbedding"}
        assert rotary == {"onnx": {""}, "ort": {"com.microsoft"}, "decomposed": set()}[op], types

    m64 = float64_mrope(model, cfg)
    rng = np.random.default_rng(1)
    errors = {}
    for where, first in (("start", 0), ("end", MROPE_CONTEXT - WINDOW)):
        feed = {"input_ids": rng.integers(0, rm.VOCAB, (2, WINDOW)), "position_ids": vision_positions(first)}
        with torch.no_grad():
            truth = m64(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()
        for kind, file in (("original", path), ("rewritten", out)):
            errors[f"{kind}_{where}"] = float(np.abs(rm.ort_logits(file, feed) - truth).max())
    note = f"{name} --op {op}: {json.dumps({k: f'{v:.2e}' for k, v in errors.items()})}"
    assert errors["rewritten_end"] <= rm.WITHIN * errors["rewritten_start"], note
    assert errors["rewritten_end"] * rm.GROWS <= errors["original_end"], note


def test_an_m_rope_selection_that_is_not_one_is_refused_naming_why(exported, tmp_path):
    """The rows the rotations read are the graph's section selection, read by a probe: a Mul inside it
    (arithmetic, not a selection of table entries) leaves no rotation to lower: exit 2, one line, no file."""
    from onnx import helper

    from pe_export.cli.main import app

    path, config, _, _ = exported("qwen2-vl")
    model = onnx.load(path)
    graph = model.graph
    concat = next(n for n in graph.node if n.op_type == "Concat" and len(n.input) == 2 and n.input[0] == n.input[1])
    half = concat.input[0]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half_scale"))
    at = list(graph.node).index(concat)
    graph.node.insert(at, helper.make_node("Mul", [half, "half_scale"], ["scaled_half"]))
    concat.input[:] = ["scaled_half", "scaled_half"]
    onnx.save(model, tmp_path / "scaled.onnx")
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(
        app, ["rewrite", str(tmp_path / "scaled.onnx"), "--config", str(config), "--op", "ort", "-o", str(out)]
    )
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "M-RoPE: the section selection is not a selection of the (3, B, S, 8) rows" in r.output
    assert not out.exists()


@pytest.mark.parametrize("op", ["onnx", "ort", "decomposed"])
def test_qwen2_vl_with_2d_positions_lowers_its_rotations(op, qwen2_vl, tmp_path):
    """The (B, S) form (the graph expands the positions to three equal rows): every --op lowers both
    rotations on the chunked sections, and every row passes."""
    from pe_export.cli.main import app

    path, config, _ = qwen2_vl
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = CliRunner().invoke(
        app, ["rewrite", str(path), "--config", str(config), "--op", op, "-o", str(out), "--report", str(report)]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    (site,) = doc["rewrite"]["sites"]
    assert site["rotations"] == 2 and site["sections"] == [0, 1, 10, 11, 12, 21, 22, 23], site
    assert all(row["verdict"] == "pass" for row in doc["sites"] + doc["whole_model"]), doc


def test_an_export_reads_mrope_section_as_m_rope_and_the_rewriter_leaves_it_to_the_graph(tmp_path):
    """from-config reads the section into M-RoPE parameters (3-D positions, pe_export.encodings.mrope), never
    into plain RoPE; the rewriter's reader leaves it out: the graph selects the sections after Cos."""
    from pe_export.hf_config import SECTION_KEYS, rope_params_from_config
    from pe_export.rewriter.params import params_from_config

    cfg = {"head_dim": 16, "rope_parameters": {"rope_type": "default", "mrope_section": MROPE_SECTION}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert rope_params_from_config(tmp_path / "config.json")["mrope_section"] == MROPE_SECTION
    from pe_export.encodings.rope import RopeParams

    assert SECTION_KEYS == ("mrope_section", "mrope_interleaved")
    assert [type(p) for p in params_from_config(tmp_path / "config.json")] == [RopeParams]


def test_no_site_names_what_is_nearest_to_one(tmp_path):
    """Issue 19: the refusal names what the graph holds nearest to a site, in one line, exit 2, so that a
    user can report the shape: here transformers 4.x's MatMul form with an extra double round trip."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from pe_export.cli.main import app

    nodes = [
        h.make_node("Unsqueeze", ["position_ids", "axis"], ["p"]),
        h.make_node("Cast", ["p"], ["pf"], to=T.FLOAT),
        h.make_node("MatMul", ["inv_freq", "pf"], ["f"]),
        h.make_node("Cast", ["f"], ["f64"], to=T.DOUBLE),
        h.make_node("Cast", ["f64"], ["f32"], to=T.FLOAT),
        h.make_node("Cos", ["f32"], ["cos"]),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("position_ids", T.INT64, ["B", "S"])],
        [h.make_tensor_value_info("cos", T.FLOAT, None)],
        [
            onnx.numpy_helper.from_array(np.ones((1, 64, 1), np.float32), "inv_freq"),
            onnx.numpy_helper.from_array(np.array([1], np.int64), "axis"),
        ],
    )
    onnx.save(h.make_model(graph), tmp_path / "m.onnx")
    cfg = {"head_dim": 128, "num_attention_heads": 1, "rope_parameters": {"rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for command in ("rewrite", "audit"):
        r = CliRunner().invoke(app, [command, str(tmp_path / "m.onnx"), "--config", str(tmp_path / "config.json")])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert (
            "a Cos reads a float32 MatMul of a Constant (1, 64, 1) and Cast(Unsqueeze(input 'position_ids'))"
            in r.output
        )
        assert "through 2 Casts; no rule matches" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "m.onnx"]
