"""optimum-onnx 0.1.0's real exports (tests/fixtures/optimum, written by make_fixtures.sh with transformers
4.57.6): every family's cos/sin site is found raw and after onnxslim/onnxsim, and Phi-3's frozen LongRoPE
branch (the export traced only the short factors) is rewritten into both tables and transformers' switch.
Reference: transformers' own rotary embedding in float64 (the installed test oracle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

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
