"""The public Python API: `pe_export.preset`, `rope_tables`, `RotaryEmbedding`, `translation_table`,
`export`, `verify`, `BadInput`, and the Python examples of README.md and docs/*.md, each run here.

Oracles: float64 NumPy computed here from the RoPE formula, transformers 5.23's own
`apply_rotary_pos_emb` in float64, torch's gradcheck, and a user's whole model in eager mode.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pe_export
from pe_export import BadInput
from pe_export.custom_ops.lowerings import OP_TARGETS

README = Path(__file__).resolve().parent.parent / "README.md"
F32_HALF_ULP = 2.0**-24  # relative: one rounding of a float64 value to float32


def exact_tables(theta: float, rotary_dim: int, positions: int):
    """cos/sin of p * theta^(-2i/R), float64, from the formula (RoFormer eq. 15), not from pe-export."""
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)  # (R/2,)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq  # (P, R/2)
    return np.cos(angles), np.sin(angles)


def test_all_names_are_listed_and_importing_loads_no_torch():
    assert {"preset", "rope_tables", "RotaryEmbedding", "translation_table", "export", "verify", "BadInput"} <= set(
        pe_export.__all__
    )
    for name in pe_export.__all__:
        assert getattr(pe_export, name) is not None
    code = "import sys, pe_export; assert 'torch' not in sys.modules, 'torch imported'; pe_export.preset"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_and_verify_stay_functions_after_their_modules_are_imported():
    import pe_export.pipeline.onnx_export  # noqa: F401
    import pe_export.verification.parity  # noqa: F401

    assert callable(pe_export.export) and callable(pe_export.verify)


def test_preset_applies_and_validates_overrides():
    p = pe_export.preset("llama3.1-rope", max_positions=32768)
    assert type(p).__name__ == "RopeParams" and p.max_positions == 32768 and p.theta == 500000.0
    with pytest.raises(BadInput, match="unknown preset 'nope'; presets: .*llama-rope"):
        pe_export.preset("nope")
    with pytest.raises(BadInput, match="rope has no parameter 'thetta'; it takes: .*theta"):
        pe_export.preset("llama-rope", thetta=1.0)
    with pytest.raises(BadInput, match="head_dim must be even and >= 2, got 127"):
        pe_export.preset("llama-rope", head_dim=127)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_rope_tables_are_the_float64_formula_rounded_once(dtype):
    p = pe_export.preset("llama-rope", max_positions=8192)
    cos, sin = pe_export.rope_tables(p, dtype)
    assert (
        cos.shape == sin.shape == (8192, 64)
        and cos.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    )
    want_cos, want_sin = exact_tables(500000.0, 128, 8192)
    eps = {"fp32": 2.0**-23, "fp16": 2.0**-10, "bf16": 2.0**-7}[dtype]
    for got, want in ((cos, want_cos), (sin, want_sin)):
        err = np.abs(got.double().numpy() - want)
        # One rounding (half an ulp, relative), plus the formula's own float64 error (a few 1e-16 times
        # the angle, which reaches 8191 rad at the last row), plus fp16's subnormal spacing.
        bound = eps / 2 * np.abs(want) + 1e-15 * 8192 + 2.0**-25
        assert np.all(err <= bound), (
            f"{dtype}: max err {err.max():.3g} at row {np.unravel_index(err.argmax(), err.shape)[0]}"
        )
    with pytest.raises(BadInput, match="rope_tables takes RopeParams"):
        pe_export.rope_tables({"head_dim": 8})


def test_rope_tables_carry_the_attention_factor():
    p = pe_export.preset("qwen2.5-yarn-rope")
    cos, sin = pe_export.rope_tables(p, "fp32")
    from pe_export.encodings.rope import inv_freq

    factor = inv_freq(p)[1]
    assert factor > 1.0  # YaRN's 0.1 ln(s) + 1
    # Row 0 is cos 0 = 1 times the factor, for every frequency.
    np.testing.assert_allclose(cos[0].double().numpy(), factor, rtol=F32_HALF_ULP)


def rotate_with_transformers(x, cos_half, sin_half, position_ids):
    """transformers 5.23's own apply_rotary_pos_emb (Llama), float64, on full-width cos/sin."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos = torch.cat([cos_half, cos_half], dim=-1)[position_ids]  # (B, S, D)
    sin = torch.cat([sin_half, sin_half], dim=-1)[position_ids]
    q, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return q


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_rotary_embedding_matches_transformers_at_the_end_of_the_table(layout):
    P, D = 4096, 64
    p = pe_export.preset("llama-rope", head_dim=D, max_positions=P)
    module = pe_export.RotaryEmbedding(p, layout=layout)
    rng = np.random.default_rng(0)
    B, H, S = 2, 3, 16  # batch > 1, an odd head count, the last 16 positions
    x = torch.from_numpy(rng.standard_normal((B, H, S, D), dtype=np.float32))
    ids = torch.arange(P - S, P).repeat(B, 1)
    y = module(x if layout == "bhsd" else x.transpose(1, 2), ids)
    y = y if layout == "bhsd" else y.transpose(1, 2)
    cos, sin = (torch.from_numpy(t) for t in exact_tables(500000.0, D, P))
    want = rotate_with_transformers(x.double(), cos, sin, ids)
    a, b = x.double()[..., : D // 2].abs(), x.double()[..., D // 2 :].abs()
    bound = (
        2 * 2.0**-23 * torch.cat([a + b, a + b], dim=-1)
    )  # pe-export's fp32 RoPE bound (verification.tolerances.TOLERANCES)
    err = (y.double() - want).abs()
    assert torch.all(err <= bound), f"max err {err.max():.3g}"


def test_rotary_embedding_decode_step_partial_rotary_and_norms():
    P, D, R = 2048, 96, 32  # a partial rotary head (GPT-NeoX style)
    p = pe_export.preset("llama-rope", head_dim=D, rotary_dim=R, max_positions=P, theta=10000.0)
    module = pe_export.RotaryEmbedding(p)
    x = torch.randn(3, 5, 1, D, dtype=torch.float32)  # (B, H, S=1, D): one token
    ids = torch.tensor([[P - 1], [1000], [0]])  # a decode step at the last position, per batch row
    y = module(x, ids)
    assert torch.equal(y[..., R:], x[..., R:])  # the tail passes through untouched (a copy)
    pair_norm = lambda t: t[..., : R // 2] ** 2 + t[..., R // 2 : R] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)  # a rotation keeps each pair's norm
    torch.testing.assert_close(y[2], x[2])  # position 0 is the identity (cos 1, sin 0)
    with pytest.raises(IndexError, match=f"position_ids value {P} is out of range"):
        module(x, torch.tensor([[P], [0], [0]]))


def test_rotary_embedding_trains():
    """Gradient with respect to x through register_autograd, checked numerically in float64."""
    p = pe_export.preset("llama-rope", head_dim=16, rotary_dim=12, max_positions=64, theta=10000.0)
    for layout in ("bhsd", "bshd"):
        module = pe_export.RotaryEmbedding(p, layout=layout).double()
        x = torch.randn(2, 3, 5, 16, dtype=torch.float64, requires_grad=True)
        ids = torch.randint(0, 64, (2, 5 if layout == "bhsd" else 3))
        assert torch.autograd.gradcheck(lambda t, module=module, ids=ids: module(t, ids), (x,))
    interleaved = pe_export.RotaryEmbedding(pe_export.preset("gpt-j-rope", max_positions=32)).double()
    x = torch.randn(1, 2, 4, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: interleaved(t, torch.tensor([[0, 7, 30, 31]])), (x,))


def test_rotary_embedding_refuses_what_it_cannot_hold():
    with pytest.raises(BadInput, match="layout must be one of bhsd, bshd, got 'sbhd'"):
        pe_export.RotaryEmbedding(pe_export.preset("llama-rope"), layout="sbhd")
    with pytest.raises(BadInput, match="computes cos/sin per call"):
        pe_export.RotaryEmbedding(pe_export.preset("llama-rope", tables="computed"))


# ---------------------------------------------------------------------------------------------------
# A user's own model with RotaryEmbedding in every attention layer, exported whole.


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, rope):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rope = pe_export.RotaryEmbedding(rope)

    def forward(self, h, position_ids):
        B, S, _ = h.shape
        q, k, v = self.qkv(h).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, D)
        q, k = self.rope(q, position_ids), self.rope(k, position_ids)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, D)
        return self.out(a.transpose(1, 2).reshape(B, S, -1))


class TinyGPT(nn.Module):
    """Embedding, attention layers that each apply pe-export's RoPE to q and k, an MLP, logits."""

    def __init__(self, rope, vocab: int = 101, dim: int = 48, heads: int = 3, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(Attention(dim, heads, rope) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers)
        )
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, ids, position_ids):
        h = self.embed(ids)  # (B, S, dim)
        for attn, mlp in zip(self.attn, self.mlp):
            h = h + attn(h, position_ids)
            h = h + mlp(h)
        return self.head(self.norm(h))  # (B, S, vocab)


@pytest.mark.parametrize("op", sorted(OP_TARGETS))
def test_a_whole_model_exports_with_each_target_and_runs_on_onnx_runtime(op, tmp_path):
    import onnx
    import onnxruntime as ort

    P = 1024
    torch.manual_seed(0)
    model = TinyGPT(pe_export.preset("llama-rope", head_dim=16, max_positions=P, theta=10000.0)).eval()
    ids, pos = torch.randint(0, 101, (2, 8)), torch.arange(8).repeat(2, 1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        model,
        (ids, pos),
        dynamo=True,
        opset_version=23,
        custom_translation_table=pe_export.translation_table(op),
        dynamic_shapes={"ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}},
        input_names=["ids", "position_ids"],
        output_names=["logits"],
        verbose=False,
    )
    path = tmp_path / f"gpt-{op}.onnx"
    program.save(str(path))
    nodes = [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]
    want = {"onnx": ("", "RotaryEmbedding"), "ort": ("com.microsoft", "RotaryEmbedding")}.get(op)
    if want:  # one fused node per q and per k of each layer
        assert nodes.count(want) == 4, nodes
    else:
        assert not any(t == "RotaryEmbedding" for _, t in nodes)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    # The last positions of the table, batch 2, rows at different offsets; and one token per row.
    S = 16
    for pos in (torch.stack([torch.arange(P - S, P), torch.arange(P - 2 * S, P - S)]), torch.tensor([[P - 1], [500]])):
        ids = torch.randint(0, 101, pos.shape)
        with torch.no_grad():
            eager = model(ids, pos).numpy()
        got = sess.run(None, {"ids": ids.numpy(), "position_ids": pos.numpy()})[0]
        # float32 through Linear/attention kernels that differ between torch and ORT (accumulation
        # order): a few 1e-7 relative to the logits' scale.
        scale = np.abs(eager).max()
        err = np.abs(got - eager).max()
        assert err <= 1e-4 * scale, f"{op}: max err {err:.3g} (logits scale {scale:.3g})"
    # The comparison can see a wrong row: RoPE logits depend on relative positions only, so move one.
    pos_prefill = torch.stack([torch.arange(P - S, P), torch.arange(P - 2 * S, P - S)])
    wrong = pos_prefill.clone()
    wrong[:, -1] -= 3
    ids = torch.randint(0, 101, pos_prefill.shape)
    with torch.no_grad():
        moved = np.abs(model(ids, wrong).numpy() - model(ids, pos_prefill).numpy()).max()
    assert moved > 100 * 1e-4 * np.abs(model(ids, pos_prefill).detach().numpy()).max(), moved
    with pytest.raises(Exception, match="out of range|out of data bounds"):
        sess.run(None, {"ids": np.zeros((1, 1), np.int64), "position_ids": np.array([[P]], np.int64)})


def test_translation_table_refuses_unknown_targets():
    with pytest.raises(
        BadInput, match="op must be one of decomposed, onnx, ort|op must be one of onnx, ort, decomposed"
    ):
        pe_export.translation_table("tensorrt")


# ---------------------------------------------------------------------------------------------------
# export() and verify(): the pipeline the CLI runs.


def test_export_and_verify_return_results(tmp_path):
    out = tmp_path / "llama.onnx"
    result = pe_export.export("llama-rope", out, seq=256, runtimes=["torch", "ort-cpu", "onnx-reference"])
    assert result.path == out and out.exists() and result.verdict == "pass"
    assert [r.runtime for r in result.verification.rows] == ["torch", "ort-cpu", "onnx-reference"]
    assert all(r.verdict == "pass" and r.worst_ratio <= 1 for r in result.verification.rows)
    again = pe_export.verify(out, runtimes=["ort-cpu"], positions="0,250:256", report=tmp_path / "r.json")
    assert again.verdict == "pass" and again.report.exists() and again.spec.params["max_positions"] == 256
    with pytest.raises(BadInput, match="exists; pass --force to overwrite it"):
        pe_export.export("llama-rope", out, seq=256)
    params = pe_export.preset("gpt-j-rope", max_positions=128)
    assert pe_export.export(params, tmp_path / "gptj.onnx", op="decomposed", runtimes=["ort-cpu"]).verdict == "pass"


def test_export_refuses_bad_input_and_writes_nothing(tmp_path):
    for call, message in [
        (
            lambda: pe_export.export("llama-rope", tmp_path / "a.onnx", seq=0),
            r"max_positions \(--seq\) must be >= 1, got 0",
        ),
        (lambda: pe_export.export("llama-rope", tmp_path / "a.onnx", op="tensorrt"), "op must be one of"),
        (lambda: pe_export.export("nope", tmp_path / "a.onnx"), "unknown preset 'nope'"),
        (
            lambda: pe_export.export("llama-rope", tmp_path / "a.onnx", dtype="fp64"),
            "dtype must be one of fp32, fp16, bf16",
        ),
        (lambda: pe_export.export("llama-rope", tmp_path / "a.onnx", runtimes=["tpu"]), "--runtimes takes"),
        (lambda: pe_export.verify(tmp_path / "missing.onnx"), "does not exist"),
    ]:
        with pytest.raises(BadInput, match=message):
            call()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Every Python example of README.md and docs/*.md runs (each distinct block once).

DOC_PAGES = [README, *sorted((README.parent / "docs").glob("*.md"))]


def doc_examples() -> list[tuple[str, str]]:
    """(page name, code) of every ```python block, a block shown on two pages once (its first page)."""
    found = {}
    for page in DOC_PAGES:
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            found.setdefault(code, page.name)
    return [(page, code) for code, page in found.items()]


def test_the_docs_have_python_examples():
    pages = [page for page, _ in doc_examples()]
    assert "README.md" in pages and pages.count("python-api.md") >= 2


@pytest.mark.parametrize(
    "index", range(len(doc_examples())), ids=[f"{p} {i + 1}" for i, (p, _) in enumerate(doc_examples())]
)
def test_docs_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page, code = doc_examples()[index]
    exec(compile(code, f"{page} Python example {index + 1}", "exec"), {})
