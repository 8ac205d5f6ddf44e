"""Per-layer RoPE: layer types with their own parameters (Gemma 3, ModernBERT) and layers without RoPE (SmolLM3,
Llama 4). Oracles: transformers 5.23 reading the same config.json, its model's own rotary embedding module (each
layer type's `inv_freq` and attention scaling) and its attention modules (`use_rope`, `layer_type`), all built at
tiny sizes with random weights; nothing is downloaded."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import pe_export
from pe_export.cli.main import app
from pe_export.encodings.rope import RopeParams, inv_freq
from pe_export.hf_config import rope_layers_from_config, rope_params_from_config
from pe_export.presets import LAYERED_PRESETS

runner = CliRunner()
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, vocab_size=32)

# name -> (transformers module, rotary class, attention class, config.json); each family in its old and new style.
CONFIGS = {
    "gemma3-old": (
        "gemma3",
        "Gemma3RotaryEmbedding",
        "Gemma3Attention",
        dict(
            model_type="gemma3_text",
            head_dim=16,
            num_hidden_layers=7,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            sliding_window_pattern=3,
        ),
    ),
    "gemma3-new": (
        "gemma3",
        "Gemma3RotaryEmbedding",
        "Gemma3Attention",
        dict(
            model_type="gemma3_text",
            head_dim=16,
            num_hidden_layers=5,
            max_position_embeddings=4096,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
            ],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        ),
    ),
    "gemma3-defaults": (  # no thetas at all: transformers' default_theta per layer type
        "gemma3",
        "Gemma3RotaryEmbedding",
        "Gemma3Attention",
        dict(model_type="gemma3_text", head_dim=16, num_hidden_layers=6, max_position_embeddings=4096),
    ),
    "modernbert-old": (
        "modernbert",
        "ModernBertRotaryEmbedding",
        "ModernBertAttention",
        dict(
            model_type="modernbert",
            num_hidden_layers=7,
            max_position_embeddings=8192,
            global_rope_theta=160000.0,
            local_rope_theta=10000.0,
            global_attn_every_n_layers=3,
        ),
    ),
    "modernbert-new": (
        "modernbert",
        "ModernBertRotaryEmbedding",
        "ModernBertAttention",
        dict(
            model_type="modernbert",
            num_hidden_layers=4,
            max_position_embeddings=8192,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    "smollm3-list": (
        "smollm3",
        "SmolLM3RotaryEmbedding",
        "SmolLM3Attention",
        dict(
            model_type="smollm3",
            num_hidden_layers=6,
            max_position_embeddings=4096,
            rope_theta=2000000.0,
            no_rope_layers=[1, 1, 0, 1, 0, 1, 1],  # longer than num_hidden_layers: transformers reads the first 6
        ),
    ),
    "smollm3-interval": (
        "smollm3",
        "SmolLM3RotaryEmbedding",
        "SmolLM3Attention",
        dict(
            model_type="smollm3",
            num_hidden_layers=9,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
            no_rope_layer_interval=3,
        ),
    ),
    "llama4-empty-list": (  # Llama 4 reads an empty no_rope_layers as absent
        "llama4",
        "Llama4TextRotaryEmbedding",
        "Llama4TextAttention",
        dict(
            model_type="llama4_text",
            head_dim=16,
            num_hidden_layers=8,
            max_position_embeddings=65536,
            num_local_experts=2,
            intermediate_size_mlp=32,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            no_rope_layers=[],
        ),
    ),
    "llama4-list": (
        "llama4",
        "Llama4TextRotaryEmbedding",
        "Llama4TextAttention",
        dict(
            model_type="llama4_text",
            head_dim=16,
            num_hidden_layers=4,
            max_position_embeddings=65536,
            num_local_experts=2,
            intermediate_size_mlp=32,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            no_rope_layers=[0, 1, 1, 0],
        ),
    ),
}


def write(folder, cfg: dict):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps({**TINY, **cfg}))
    return path


def transformers_side(path, module: str, rotary: str, attention: str):
    """(config, rotary module, attention modules) as the model's own code builds them from `path`."""
    import importlib

    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(str(path.parent))
    if hasattr(config, "text_config") and module != "modernbert":
        config = config.get_text_config()
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    attn = getattr(mod, attention)
    return config, getattr(mod, rotary)(config), [attn(config, i) for i in range(config.num_hidden_layers)]


@pytest.mark.parametrize("name", CONFIGS)
def test_each_layer_type_has_transformers_frequencies(tmp_path, name):
    """Each layer type's inv_freq (float32 angles: transformers' own elementwise float32 chain, so exact) and
    attention factor equal those of the model's rotary module; the float64 frequencies round to them."""
    module, rotary_cls, attention_cls, cfg = CONFIGS[name]
    path = write(tmp_path / name, cfg)
    found = rope_layers_from_config(path)
    config, rotary, attentions = transformers_side(path, module, rotary_cls, attention_cls)
    per_type = hasattr(rotary, "layer_types")
    rope_layers = [i for i, a in enumerate(attentions) if getattr(a, "use_rope", True)]
    assert set(found.rope) == {config.layer_types[i] for i in rope_layers}
    for layer_type, params in found.rope.items():
        want = getattr(rotary, f"{layer_type}_inv_freq" if per_type else "inv_freq").numpy()
        scale = getattr(rotary, f"{layer_type}_attention_scaling" if per_type else "attention_scaling")
        ours32, factor = inv_freq(RopeParams(**{**params, "angles": "float32"}))
        np.testing.assert_array_equal(ours32.astype(np.float32), want, err_msg=f"{name} {layer_type}")
        assert factor == pytest.approx(scale, rel=1e-15)
        ours64, _ = inv_freq(RopeParams(**params))
        np.testing.assert_allclose(ours64, want.astype(np.float64), rtol=4 * 2.0**-23, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_lists_are_what_the_modeling_code_does(tmp_path, name):
    """Which layers skip RoPE (the attention modules' `use_rope`) and which parameter set each layer reads
    (`config.layer_types[i]`, the key the model's forward passes to its rotary module)."""
    module, rotary_cls, attention_cls, cfg = CONFIGS[name]
    path = write(tmp_path / name, cfg)
    found = rope_layers_from_config(path)
    config, rotary, attentions = transformers_side(path, module, rotary_cls, attention_cls)
    skip = [i for i, a in enumerate(attentions) if not getattr(a, "use_rope", True)]
    assert list(found.nope) == skip
    for layer_type, layers in found.layers.items():
        assert list(layers) == [i for i, t in enumerate(config.layer_types) if t == layer_type and i not in skip]
    every = sorted([*found.nope, *(i for layers in found.layers.values() for i in layers)])
    assert every == list(range(config.num_hidden_layers))


def test_llama4_pairs_are_interleaved(tmp_path):
    """Llama 4 rotates (2i, 2i+1) pairs (its apply_rotary_emb views x as complex numbers of adjacent values), so
    its config reads as interleaved pairing."""
    import torch
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

    angles = torch.rand(1, 3, 4, dtype=torch.float64)  # (B, S, R/2)
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64)  # (B, S, H, D)
    got, _ = apply_rotary_emb(x, x, torch.polar(torch.ones_like(angles), angles))
    pairs = x.reshape(1, 3, 2, 4, 2)  # (B, S, H, R/2, 2): adjacent values
    c, s = torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None]
    want = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    torch.testing.assert_close(got.double(), want.reshape(1, 3, 2, 8), rtol=1e-6, atol=1e-6)  # float32 inside
    path = write(tmp_path / "l4", CONFIGS["llama4-list"][3])
    assert rope_params_from_config(path)["pairing"] == "interleaved"


# layered preset -> (transformers config class, its published values where they differ from the class defaults)
PRESET_CONFIGS = {
    "gemma3-rope": (
        "Gemma3TextConfig",
        dict(num_hidden_layers=34, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    ),
    "modernbert-rope": ("ModernBertConfig", {}),
    "smollm3-rope": ("SmolLM3Config", {}),
    "llama4-rope": (
        "Llama4TextConfig",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        ),
    ),
}


def test_every_layered_preset_has_a_config():
    assert set(PRESET_CONFIGS) == set(LAYERED_PRESETS)


@pytest.mark.parametrize("name", PRESET_CONFIGS)
def test_layered_preset_is_what_transformers_config_gives(tmp_path, name):
    """The preset equals the config.json that transformers' config class writes (its defaults are the published
    model's), read back by from-config: each layer type's parameters, the layer lists and the NoPE layers."""
    transformers = pytest.importorskip("transformers")
    cls, values = PRESET_CONFIGS[name]
    folder = tmp_path / name
    getattr(transformers, cls)(**values).save_pretrained(str(folder))
    found = pe_export.rope_layers(folder / "config.json")
    want = pe_export.rope_layers(name)
    assert found == want


def test_from_config_writes_one_file_per_layer_type(tmp_path, monkeypatch):
    """Two distinct sets: <folder>-rope-<layer_type>.onnx each, verified; the layer map is printed."""
    from pe_export.pipeline.onnx_export import load

    path = write(tmp_path / "gemma", CONFIGS["gemma3-old"][3])
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["from-config", str(path), "--seq", "64", "--runtimes", "ort-cpu"])
    assert result.exit_code == 0, result.output
    found = rope_layers_from_config(path, max_positions=64)
    for layer_type in ("sliding_attention", "full_attention"):
        out = tmp_path / f"gemma-rope-{layer_type}.onnx"
        assert RopeParams(**load(out)[1].params) == RopeParams(**{**found.rope[layer_type], "tables": "constant"})
        assert f"verified: gemma-rope-{layer_type}.onnx" in result.output
    assert "sliding_attention (layers 0-1, 3-4, 6)" in result.output and "full_attention (layers 2, 5)" in result.output
    assert "every layer uses RoPE" in result.output


def test_from_config_nope_layers_one_set_one_file(tmp_path, monkeypatch):
    """SmolLM3: one parameter set keeps the single-file name (<folder>-rope.onnx); the NoPE layers are printed."""
    path = write(tmp_path / "smol", CONFIGS["smollm3-list"][3])
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["from-config", str(path), "--seq", "64", "--runtimes", "ort-cpu"])
    assert result.exit_code == 0, result.output
    assert "full_attention (layers 0-1, 3, 5) -> smol-rope.onnx" in result.output
    assert "no RoPE (NoPE) in layers 2, 4" in result.output
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["smol-rope.onnx"]


def test_layered_preset_command_and_output_names(tmp_path):
    """`pe-export modernbert-rope -o X.onnx` writes X-<layer_type>.onnx per distinct set (and a report each)."""
    out = tmp_path / "mb.onnx"
    args = [
        "modernbert-rope",
        "--seq",
        "48",
        "-o",
        str(out),
        "--runtimes",
        "ort-cpu",
        "--report",
        str(tmp_path / "r.json"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "mb-full_attention.onnx",
        "mb-sliding_attention.onnx",
        "r-full_attention.json",
        "r-sliding_attention.json",
    ]
    assert json.loads((tmp_path / "r-full_attention.json").read_text())["spec"]["params"]["theta"] == 160000.0
    assert "full_attention (layers 0, 3, 6, 9, 12, 15, 18, 21) -> " in result.output
    assert "theta=160000.0, pairing=half, max_positions=48" in result.output
    # Again without --force: refused before anything is written, one line, exit 2.
    (tmp_path / "mb-full_attention.onnx").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_list_shows_the_layered_presets():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert all(name in result.output for name in LAYERED_PRESETS)


def test_api_export_layers(tmp_path):
    results = pe_export.export_layers("gemma3-rope", tmp_path / "g.onnx", max_positions=32, runtimes=("ort-cpu",))
    assert set(results) == {"sliding_attention", "full_attention"}
    assert all(r.verification.verdict == "pass" for r in results.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g-full_attention.onnx", "g-sliding_attention.onnx"]
    layers = pe_export.rope_layers("gemma3-rope", max_positions=32)
    assert layers.rope["full_attention"].scaling_params == {"factor": 8.0} and layers.layers["full_attention"][0] == 5
    with pytest.raises(pe_export.BadInput, match="rope_layers takes a config.json path or a layered preset"):
        pe_export.rope_layers("gemma3")


BAD = [
    (
        "missing-layer-type",
        dict(
            model_type="gemma3_text",
            head_dim=16,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "chunked_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        ),
        "config key 'rope_parameters' has no entry for layer type 'chunked_attention' (in 'layer_types'); it has: "
        "sliding_attention",
    ),
    (
        "no-rope-short",
        dict(model_type="smollm3", num_hidden_layers=4, no_rope_layers=[1, 1, 0]),
        "config key 'no_rope_layers' must have at least num_hidden_layers (4) entries (1: RoPE, 0: NoPE), got 3",
    ),
    (
        "no-rope-values",
        dict(model_type="llama4_text", head_dim=16, num_hidden_layers=2, no_rope_layers=[1, 2]),
        "config key 'no_rope_layers' must be a list of 1 (RoPE) and 0 (NoPE), got [1, 2]",
    ),
    (
        "layer-types-length",
        dict(model_type="modernbert", num_hidden_layers=3, layer_types=["full_attention"]),
        "config key 'layer_types' must have num_hidden_layers (3) entries, got 1",
    ),
    (
        "bad-theta-in-a-type",
        dict(model_type="modernbert", num_hidden_layers=3, local_rope_theta=-1.0),
        "config key 'local_rope_theta' must be > 0, got -1.0",
    ),
]


@pytest.mark.parametrize("name,cfg,message", BAD, ids=[b[0] for b in BAD])
def test_bad_configs(tmp_path, name, cfg, message):
    path = write(tmp_path / name, cfg)
    result = runner.invoke(app, ["from-config", str(path), "--seq", "64", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == f"pe-export: error: {message}", result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    with pytest.raises(pe_export.BadInput):
        pe_export.rope_layers(path)


def test_rewrite_reads_old_style_gemma3_configs(tmp_path):
    """`pe-export rewrite --config` on a Gemma 3 config.json as the Hub has them (top-level rope_theta,
    rope_local_base_freq, rope_scaling): one parameter set per layer type, as transformers builds them."""
    from pe_export.rewriter.params import params_from_config

    path = write(tmp_path / "g", CONFIGS["gemma3-old"][3])
    local, full = params_from_config(path)
    assert (local.theta, local.scaling) == (10000.0, "default")
    assert (full.theta, full.scaling, full.scaling_params) == (1e6, "linear", {"factor": 8.0})
