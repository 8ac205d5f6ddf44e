"""`pe_export.patch`: exact RoPE tables inside transformers models, then any exporter.

Oracle: the user's own transformers model run entirely in float64, its rotary module included. transformers'
rope init functions and forwards write `torch.float` / `.float()`; `float64_torch` points those at float64
while the oracle model is built and run, so its inv_freq and angles are transformers' own code in float64,
not pe-export's. Tiny random models (transformers 5.23 classes), q/k sharpened so that attention is
sharp and an error in a position's angle shows in the logits.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pe_export  # noqa: E402
from pe_export.errors import BadInput  # noqa: E402
from pe_export.patching import PatchedRotary  # noqa: E402

NORM_GAIN = 8.0  # through q_norm/k_norm (output ~1 per element): unpatched Qwen3 46x at 4096, patched 2x
# Phi-3's fused qkv_proj: at 30 the float32 accumulation over 4096 keys alone gave 5.4x positions 0-63 with
# exact tables (cos/sin within 6e-8 of float64 everywhere); at 12 unpatched 66x, patched 1.4x (eager, seq 4096).
FUSED_GAIN = 12.0
SHARPEN = 30.0  # q/k gain (scores 900x a random init): float32 angles then give 20x more error at 2048 than at 0-63
HEAD = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
COMMON = dict(**HEAD, num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
RATIO = 3.0  # the brief's bound: error at the last 64 positions <= 3x the error at positions 0-63
LONG_SEQ = 4096


def _families():
    """name -> (config class, model class, config kwargs). transformers' own names and rope_parameters."""
    T = transformers
    longrope = dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=[1.0 + 0.05 * i for i in range(8)],
        long_factor=[1.0 + 0.7 * i for i in range(8)],
        original_max_position_embeddings=1024,
        factor=4.0,
    )
    return {
        "llama3.1": (
            T.LlamaConfig,
            T.LlamaForCausalLM,
            dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=500000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=512,
                )
            ),
        ),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
        "phi3-longrope": (T.Phi3Config, T.Phi3ForCausalLM, dict(rope_parameters=longrope)),
        "gemma3": (
            T.Gemma3TextConfig,
            T.Gemma3ForCausalLM,
            dict(
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=LONG_SEQ,
                rope_parameters=dict(
                    sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                    full_attention=dict(rope_type="linear", rope_theta=1e6, factor=8.0),
                ),
            ),
        ),
        "qwen2-vl-text": (
            T.Qwen2VLTextConfig,
            T.Qwen2VLTextModel,
            dict(rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        ),
        "smollm3": (
            T.SmolLM3Config,
            T.SmolLM3ForCausalLM,
            dict(rope_parameters=dict(rope_type="default", rope_theta=2e6)),
        ),
        "deepseek-v3": (
            T.DeepseekV3Config,
            T.DeepseekV3ForCausalLM,
            dict(
                q_lora_rank=32,
                kv_lora_rank=16,
                qk_rope_head_dim=16,
                qk_nope_head_dim=16,
                v_head_dim=16,
                first_k_dense_replace=2,  # dense layers only
                n_routed_experts=4,
                num_experts_per_tok=2,
                rope_parameters=dict(
                    rope_type="yarn",
                    rope_theta=10000.0,
                    factor=4.0,
                    original_max_position_embeddings=1024,
                    beta_fast=32.0,
                    beta_slow=1.0,
                    mscale=1.0,
                    mscale_all_dim=1.0,
                ),
            ),
        ),
    }


FAMILIES = _families()


@contextlib.contextmanager
def float64_torch():
    """transformers' `torch.float`, `torch.float32` and `Tensor.float()` mean float64 inside (test oracle only)."""
    saved = torch.float, torch.float32, torch.Tensor.float
    torch.float = torch.float32 = torch.float64
    torch.Tensor.float = torch.Tensor.double
    try:
        yield
    finally:
        torch.float, torch.float32, torch.Tensor.float = saved


def build(family: str, max_positions: int = LONG_SEQ):
    config_cls, model_cls, kwargs = FAMILIES[family]
    common = COMMON
    if family == "deepseek-v3":  # MLA: one key per query head; head sizes come from the qk_*/v_* keys
        common = {**{k: v for k, v in COMMON.items() if k != "head_dim"}, "num_key_value_heads": 4}
    config = config_cls(**common, **kwargs, max_position_embeddings=max_positions, attn_implementation="eager")
    torch.manual_seed(0)
    model = model_cls(config).eval()
    sharpen(model)
    return model, config, model_cls


def sharpen(model) -> None:
    """Scale q and k by SHARPEN: through q_norm/k_norm where the family normalises them (Qwen3, Gemma 3),
    else through the projections that make q and k (DeepSeek's q_b_proj and kv_a_proj_with_mqa)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in ("q_norm", "k_norm"):
                if "Gemma" in type(m).__name__:  # Gemma's RMSNorm multiplies by (1 + weight)
                    m.weight.copy_((1 + m.weight) * NORM_GAIN - 1)
                else:
                    m.weight.mul_(NORM_GAIN)
        normed = {name.rpartition(".")[0] for name, _ in model.named_modules() if name.endswith("q_norm")}
        for name, m in model.named_modules():
            parent, _, leaf = name.rpartition(".")
            if parent not in normed and leaf in ("q_proj", "k_proj", "q_b_proj", "kv_a_proj_with_mqa"):
                m.weight.mul_(SHARPEN)
            elif leaf == "qkv_proj":  # Phi-3's fused projection: rows q (H*D), then k (KV*D), then v
                config = model.config
                qk = (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
                m.weight[:qk].mul_(FUSED_GAIN)


def logits_of(model, input_ids, position_ids):
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state @ model.embed_tokens.weight.T  # Qwen2-VL's text model: tied head


def inputs(family: str, seq: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, seq), generator=g)
    pos = torch.arange(seq)[None]  # (1, S)
    if family == "qwen2-vl-text":  # (3, B, S): temporal, height, width rows differ, so the sections matter
        pos = torch.stack([pos, pos // 2, (pos * 3) // 4])
    return ids, pos


def float64_oracle(family: str, model, config, model_cls, ids, pos) -> np.ndarray:
    """transformers' own model, rotary module included, in float64."""
    with float64_torch():
        oracle = model_cls(config).eval()
        oracle.load_state_dict(model.state_dict())
        oracle.double()
        with torch.no_grad():
            return logits_of(oracle, ids, pos).numpy()


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        return logits_of(self.model, input_ids, position_ids)


def onnx_logits(model, ids, pos, path) -> np.ndarray:
    import onnxruntime as ort

    torch.onnx.export(
        Logits(model).eval(), (ids, pos), str(path), dynamo=True, input_names=["input_ids", "position_ids"]
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_providers()[0] == "CPUExecutionProvider"
    return session.run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})[0]


def errors_by_block(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """max abs error over positions 0-63 and over the last 64 positions."""
    diff = np.abs(got.astype(np.float64) - want)  # (1, S, V)
    return float(diff[:, :64].max()), float(diff[:, -64:].max())


def check_family(family: str, seq: int, tmp_path) -> dict:
    model, config, model_cls = build(family, max_positions=seq)
    ids, pos = inputs(family, seq)
    with torch.no_grad():
        unpatched = logits_of(model, ids, pos).numpy()
    want = float64_oracle(family, model, config, model_cls, ids, pos)
    replaced = pe_export.patch(model)
    assert replaced and all(isinstance(model.get_submodule(n), PatchedRotary) for n in replaced)
    got = onnx_logits(model, ids, pos, tmp_path / f"{family}.onnx")
    first, last = errors_by_block(got, want)
    scale = float(np.abs(want).max())
    # Unpatched vs exported at positions 0-15: the same model up to float32 rounding of activations
    # (float32 angles there are within 16 * 2^-24 of exact); bound: 2^-16 of the logit scale.
    near = float(np.abs(got[:, :16] - unpatched[:, :16]).max())
    assert near <= 2.0**-16 * scale, f"{family}: positions 0-15 differ from the unpatched model by {near:.3e}"
    assert last <= RATIO * first, (
        f"{family}: error at the last 64 positions {last:.3e} > {RATIO}x positions 0-63 {first:.3e} (seq {seq})"
    )
    pe_export.unpatch(model)
    before = errors_by_block(unpatched, want)  # for the record (docs/patch.md): the unpatched ratio
    print(f"{family} unpatched eager: 0-63 {before[0]:.3e}, last 64 {before[1]:.3e}")
    print(
        f"{family} seq {seq}: error 0-63 {first:.3e}, last 64 {last:.3e}, "
        f"vs unpatched 0-15 {near:.3e}, scale {scale:.3e}"
    )
    return dict(first=first, last=last, near=near, scale=scale)


# ---------------------------------------------------------------------------------------------------
# Fast default tests.


def test_llama_end_to_end_small_seq(tmp_path):
    check_family("llama3.1", 256, tmp_path)


def test_unpatch_and_context_manager_restore_the_model():
    model, _, _ = build("gemma3", max_positions=64)
    original = model.model.rotary_emb
    ids, pos = inputs("gemma3", 32)
    with torch.no_grad():
        before = logits_of(model, ids, pos)
    with pe_export.patched(model) as replaced:
        assert replaced == {"model.rotary_emb": original}
        assert isinstance(model.model.rotary_emb, PatchedRotary)
        assert set(model.model.rotary_emb.params) == {"sliding_attention", "full_attention"}
        assert not any(isinstance(m, type(original)) for m in model.modules())  # the original is not a submodule
    assert model.model.rotary_emb is original
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, ids, pos), before, rtol=0, atol=0)
    removed = pe_export.unpatch(model)  # nothing left to undo
    assert removed == {}


def test_unsupported_config_is_bad_input_and_nothing_is_patched():
    model, config, _ = build("llama3.1", max_positions=64)
    rotary = model.model.rotary_emb
    rotary.config.rope_parameters = {**config.rope_parameters, "rope_type": "no-such-rule"}
    with pytest.raises(BadInput, match="rope_type 'no-such-rule'"):
        pe_export.patch(model)
    assert model.model.rotary_emb is rotary


def test_a_module_that_differs_from_its_config_is_refused():
    model, _, _ = build("qwen3", max_positions=64)
    rotary = model.model.rotary_emb
    rotary.inv_freq.mul_(1.01)  # not what the config says: pe-export's tables would change the model
    with pytest.raises(BadInput, match="unsupported RoPE variant"):
        pe_export.patch(model)
    assert model.model.rotary_emb is rotary


def test_no_rotary_module_and_patching_twice_are_bad_input():
    with pytest.raises(BadInput, match="has no rotary-embedding module"):
        pe_export.patch(torch.nn.Linear(2, 2))
    model, _, _ = build("qwen3", max_positions=64)
    pe_export.patch(model)
    with pytest.raises(BadInput, match="already patched"):
        pe_export.patch(model)


def test_a_shared_rotary_module_is_replaced_on_every_path():
    model, _, _ = build("qwen3", max_positions=64)
    shared = model.model.rotary_emb
    model.model.layers[0].rotary_alias = shared  # a second path to the same module
    replaced = pe_export.patch(model)
    assert set(replaced) == {"model.rotary_emb", "model.layers.0.rotary_alias"}
    assert model.model.layers[0].rotary_alias is model.model.rotary_emb
    pe_export.unpatch(model)
    assert model.model.layers[0].rotary_alias is shared and model.model.rotary_emb is shared


@pytest.mark.parametrize("seq", [0, -3, 2.5, True])
def test_bad_seq_is_bad_input(seq):
    model, _, _ = build("qwen3", max_positions=64)
    with pytest.raises(BadInput, match="seq must be an integer >= 1"):
        pe_export.patch(model, seq=seq)


def test_patched_model_trains_gradients_reach_q_and_k():
    model, _, _ = build("qwen3", max_positions=64)
    pe_export.patch(model)
    ids, pos = inputs("qwen3", 32)
    logits = logits_of(model, ids, pos)
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    rotary = model.model.rotary_emb
    assert all(not b.requires_grad for b in rotary.buffers())  # the tables are constants, not parameters


def test_torch_export_holds_the_tables_as_constants():
    """The program ExecuTorch and LiteRT-torch start from carries the float64-built tables."""
    model, config, _ = build("llama3.1", max_positions=128)
    pe_export.patch(model)
    ids, pos = inputs("llama3.1", 16)
    program = torch.export.export(Logits(model).eval(), (ids, pos))
    held = {**program.constants, **program.state_dict}
    table = model.model.rotary_emb.cos_
    assert any(t.shape == table.shape and torch.equal(t, table) for t in held.values() if torch.is_tensor(t))
    # Independent check of one row: transformers' own default inv_freq in float64 at a late position.
    with float64_torch():
        inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
    assert inv_freq.dtype == torch.float64
    expected = torch.cos(127 * inv_freq).float()
    torch.testing.assert_close(table[127], expected, rtol=0, atol=2.0**-24)


def test_docs_example_runs(tmp_path, monkeypatch):
    """docs/patch.md's example, run as written there (in a temporary folder), and what it leaves."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "patch.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_example"}
    exec(compile(code, "docs/patch.md", "exec"), namespace)
    assert (tmp_path / "llama-patched.onnx").is_file()
    assert namespace["replaced"] and type(namespace["model"].model.rotary_emb).__name__ == "LlamaRotaryEmbedding"


def test_patching_imports_no_transformers():
    """transformers is test-only: the module finds rotary modules by name and interface."""
    import subprocess
    import sys

    code = "import sys, pe_export; pe_export.patch; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "family, rope, seq",
    [
        ("llama3.1", dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0), 200),  # rescaled: 200 > 64
        ("llama3.1", dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0), 40),  # unscaled base
        ("phi3-longrope", None, 48),  # short factors: 48 <= original 64
        ("phi3-longrope", None, 200),  # long factors
    ],
)
def test_run_time_rules_match_transformers_float64_module(family, rope, seq):
    """Dynamic NTK's rescaling and LongRoPE's switch, per call, against a fresh transformers rotary module
    built and run in float64 (float32 rounding of the table is all that may differ)."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    rope = rope or {**kwargs["rope_parameters"], "original_max_position_embeddings": 64}
    config = config_cls(**COMMON, rope_parameters=rope, max_position_embeddings=256)
    model = model_cls(config).eval()
    pos = torch.arange(seq)[None]  # (1, S)
    with float64_torch():
        want = type(model.model.rotary_emb)(config)(torch.zeros(1, dtype=torch.float64), pos)
    pe_export.patch(model)
    got = model.model.rotary_emb(torch.zeros(1), pos)
    for w, g in zip(want, got, strict=True):
        assert w.dtype == torch.float64 and g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2.0**-23)


# ---------------------------------------------------------------------------------------------------
# The seven families at a long sequence.


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_exact_tables(family, tmp_path):
    check_family(family, LONG_SEQ, tmp_path)
