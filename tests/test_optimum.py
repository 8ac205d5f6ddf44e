"""optimum-onnx 0.1.0's real exports (tests/fixtures/optimum, written by make_fixtures.sh with transformers
4.57.6): every family's cos/sin site is found raw and after onnxslim/onnxsim, and Phi-3's frozen LongRoPE
branch (the export traced only the short factors) is rewritten into both tables and transformers' switch.
Reference: transformers' own rotary embedding in float64 (the installed test oracle), and for Phi-3's logits
transformers 5.23's Phi3ForCausalLM in float64 carrying the fixture's own weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).parent))
import rewrite_models as rm  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "optimum"
FAMILIES = ("llama", "qwen2", "phi3", "gemma")
VARIANTS = ("model", "model.slim", "model.sim")


def rewritten(family: str, variant: str):
    from pe_export.rewriter.core import rewrite_model

    return rewrite_model(ir.load(FIXTURES / family / f"{variant}.onnx"), FIXTURES / family / "config.json")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_matched(family, variant):
    result = rewritten(family, variant)
    assert result.sites, f"{family} {variant}: no RoPE site found"


@pytest.mark.parametrize("variant", VARIANTS)
def test_frozen_longrope_branch_is_restored(variant):
    result = rewritten("phi3", variant)
    assert sorted(s.seq_len for s in result.sites) == [64, 65], [s.seq_len for s in result.sites]
    assert all("only the short factors; transformers' switch at 64 restored" in s.restored for s in result.sites)


def cos_of(model: ir.Model, name: str, seq: int) -> np.ndarray:
    """The (1, S, R) value `name` of `model` run on positions 0..seq-1 (no past)."""
    model.graph.outputs.append(next(v for n in model.graph for v in n.outputs if v.name == name))
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": np.zeros((1, seq), np.int64),
        "attention_mask": np.ones((1, seq), np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None],
    }
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    return sess.run([name], feed)[0]


@pytest.mark.parametrize("seq", [64, 256])  # the short regime (max position 63) and the long one (255)
def test_phi3_rewrite_follows_transformers_switch(seq):
    import torch
    from transformers import AutoConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    result = rewritten("phi3", "model.slim")
    site = result.sites[0]
    got = cos_of(result.model, site.cos, seq)[0]  # (S, R)
    cfg = AutoConfig.from_pretrained(FIXTURES / "phi3")
    rope = Phi3RotaryEmbedding(cfg).double()
    x = torch.zeros(1, seq, 16, dtype=torch.float64)
    want, _ = rope(x, torch.arange(seq)[None])
    want = want[0].numpy()  # (S, R) float64, long factors when seq > 64
    # transformers builds inv_freq in float32 before .double(): position t carries t * 1 ulp of it (3e-5 at 255)
    assert np.abs(got - want).max() < 3e-5, np.abs(got - want).max()
    original = ir.load(FIXTURES / "phi3" / "model.slim.onnx")
    frozen = cos_of(original, site.cos, seq)[0]
    if seq == 256:  # the export's frozen short factors are far off the long regime; the rewrite is not
        assert np.abs(frozen - want).max() > 1e-2


def test_cli_reports_the_restored_switch(tmp_path):
    from typer.testing import CliRunner

    from pe_export.cli.main import app

    d = FIXTURES / "phi3"
    args = [
        "rewrite",
        d / "model.onnx",
        "--config",
        d / "config.json",
        "--runtimes",
        "ort-cpu",
        "-o",
        tmp_path / "x.onnx",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "restored: the export held only the short factors; transformers' switch at 64 restored" in result.output
    assert "FAIL" not in result.output


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_rewrites_and_verifies(family, variant, tmp_path):
    """The whole `pe-export rewrite` flow on the default runtimes: every site and the whole model pass.
    Gemma's graph has no position input (Range from the past length): its sites are checked on a
    contiguous window at the end of the table, fed through a past of that length."""
    from pe_export.rewriter.run import rewrite_and_verify

    d = FIXTURES / family
    run = rewrite_and_verify(d / f"{variant}.onnx", d / "config.json", output=tmp_path / "x.onnx")
    assert run.verdict == "pass", [(r.site, r.runtime, r.verdict, r.note) for r in run.site_rows + run.whole_rows]
    assert {r.runtime for r in run.site_rows if r.verdict == "pass"} == {"ort-cpu", "ort-cpu-noopt"}
    if family == "gemma":
        last = max(p for r in run.site_rows for p in r.positions)
        assert last == run.result.sites[0].params["max_positions"] - 1  # the end of the table was checked


def fixture_weights(family: str, variant: str) -> dict[str, np.ndarray]:
    """transformers' state dict as far as `variant`'s initializers hold it: those optimum kept under their
    parameter name (the embedding; the raw export's input RMSNorm), the other RMSNorm weights the raw
    export shares through Identity (onnxslim and onnxsim fold those all-ones away), and each MatMul's
    weight (stored transposed, (in, out)) under its node's module path
    (`/model/layers.0/self_attn/qkv_proj/MatMul` -> `model.layers.0.self_attn.qkv_proj.weight`)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(FIXTURES / family / f"{variant}.onnx")
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weights = {name: v for name, v in values.items() if name.endswith(".weight")}
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
        elif node.op_type == "MatMul" and node.input[1] in values:
            module = node.name.strip("/").replace("/", ".").removesuffix(".MatMul")
            weights[f"{module}.weight"] = values[node.input[1]].T  # (out, in), as nn.Linear holds it
    return weights


@pytest.fixture(scope="module")
def phi3_float64():
    """transformers 5.23's Phi3ForCausalLM built from the fixture's config, carrying the raw export's
    weights (every parameter, strict), in float64 with float64 RoPE and LongRoPE's switch
    (`rewrite_models.oracle`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(FIXTURES / "phi3")
    cfg._attn_implementation = "eager"
    weights = fixture_weights("phi3", "model")
    # tied: loading both names writes one tensor, so they must agree or one would be silently lost
    assert np.array_equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=True)
    return rm.oracle(model, cfg)


def phi3_run(model: bytes | None, m64, ids: np.ndarray, start: int, past=None):
    """(logits (B, S, V), past for the next call) of `model` (serialized ONNX; None: the float64 oracle) on
    `ids` (B, S) at positions start..start+S-1 after `past` (the previous call's, of length `start`)."""
    import torch

    B, S = ids.shape
    positions = np.repeat(np.arange(start, start + S)[None], B, axis=0)  # (B, S)
    if model is None:
        with torch.no_grad():
            out = m64(
                input_ids=torch.from_numpy(ids),
                position_ids=torch.from_numpy(positions),
                past_key_values=past,
                use_cache=True,
            )
        return out.logits.numpy(), out.past_key_values
    empty = np.zeros((B, 2, 0, 16), np.float32)  # (B, H_kv, T, D)
    key, value = past if past is not None else (empty, empty)
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((B, start + S), np.int64),
        "position_ids": positions,
        "past_key_values.0.key": key,
        "past_key_values.0.value": value,
    }
    logits, *present = rm.ort_outputs(model, feed)
    return logits, present


def phi3_errors(files: dict[str, bytes], m64, batch: int = 2) -> tuple[dict[str, float], float]:
    """Max abs logits error of each file against the float64 model, batch `batch`, and max|logits|:
    'start' a 64-token prompt (positions 0-63, short factors); 'end' the last 64 positions (192-255) of a
    prompt of the whole 256 context (long factors); 'cached' the same positions when the 192 tokens past
    64 follow a 64-token past that the file (or the oracle) wrote itself. transformers picks the factors
    per call from max(position_ids) + 1: the new tokens take the long factors, the past keeps its short
    ones."""
    ids = np.random.default_rng(0).integers(0, 128, (batch, 256), dtype=np.int64)
    runs = {None: {}, **{name: {} for name in files}}
    for name, run in runs.items():
        model = files.get(name)
        run["start"], short_past = phi3_run(model, m64, ids[:, :64], 0)
        run["end"] = phi3_run(model, m64, ids, 0)[0][:, -64:]
        run["cached"] = phi3_run(model, m64, ids[:, 64:], 64, short_past)[0][:, -64:]
    truth = runs.pop(None)
    errors = {
        f"{name}_{where}": float(np.abs(run[where] - truth[where]).max()) for name, run in runs.items() for where in run
    }
    return errors, max(float(np.abs(t).max()) for t in truth.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_phi3_logits_at_the_end_of_the_context_are_as_close_as_at_the_start(variant, phi3_float64):
    """Issue 19's acceptance check for optimum's Phi-3: against the float64 model with LongRoPE's switch,
    the rewritten export's logits at the last 64 positions of the 256 context are within 3x of its
    error at positions 0-63, prompted whole or after a short past; the frozen original (short factors
    only) fails that same check."""
    weights = fixture_weights("phi3", variant)
    params = phi3_float64.state_dict()
    assert {k for k in params if "norm" not in k} <= set(weights), sorted(weights)  # every projection
    for key, value in weights.items():  # the oracle is this file's model, weight for weight
        assert np.array_equal(params[key].float().numpy(), value), key
    original = (FIXTURES / "phi3" / f"{variant}.onnx").read_bytes()
    restored = ir.serde.serialize_model(rewritten("phi3", variant).model).SerializeToString()
    e, scale = phi3_errors({"original": original, "rewritten": restored}, phi3_float64)
    note = f"{variant}, max|logits| {scale:.2f}: {json.dumps({k: f'{v:.2e}' for k, v in e.items()})}"
    assert e["rewritten_end"] <= rm.WITHIN * e["rewritten_start"], note
    assert e["rewritten_cached"] <= rm.WITHIN * e["rewritten_start"], note
    assert max(e["rewritten_start"], e["rewritten_end"], e["rewritten_cached"]) <= 1e-5 * scale, note
    assert e["original_end"] > rm.WITHIN * e["original_start"], note  # the same check fails on the export
    assert min(e["original_end"], e["original_cached"]) >= rm.GROWS * max(e["rewritten_end"], e["rewritten_cached"]), (
        note
    )
