"""`pe-export from-config`: RoPE parameters from local config.json files written here, one per preset
family in the old (`rope_scaling`, top-level `rope_theta`) and new (`rope_parameters`) key styles.
Expected values are the models' published config values (`shared/reference/encodings.md` section 9),
and, where transformers reads the same file, its own `inv_freq` from that config."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.encodings.rope import RopeParams, inv_freq
from pe_export.hf_config import rope_params_from_config
from pe_export.presets import PRESETS

LLAMA31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# preset -> (model_type, top-level keys, rope type, scaling keys or None)
FAMILIES = {
    "llama-rope": (
        "llama",
        dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=8192),
        500000.0,
        None,
    ),
    "llama3.1-rope": (
        "llama",
        dict(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072),
        500000.0,
        ("llama3", LLAMA31_SCALING),
    ),
    "llama3.2-1b-rope": (
        "llama",
        dict(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072),
        500000.0,
        ("llama3", {**LLAMA31_SCALING, "factor": 32.0}),
    ),
    "llama2-rope": (
        "llama",
        dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096),
        10000.0,
        None,
    ),
    "mistral-rope": (
        "mistral",
        dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=32768, sliding_window=4096),
        10000.0,
        None,
    ),
    "qwen2-rope": (
        "qwen2",
        dict(hidden_size=3584, num_attention_heads=28, max_position_embeddings=131072),
        1000000.0,
        None,
    ),
    "qwen2.5-yarn-rope": (
        "qwen2",
        dict(hidden_size=3584, num_attention_heads=28, max_position_embeddings=131072),
        1000000.0,
        ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32768}),
    ),
    "gemma-rope": (
        "gemma",
        dict(hidden_size=3072, num_attention_heads=16, head_dim=256, max_position_embeddings=8192),
        10000.0,
        None,
    ),
    "falcon-rope": (
        "falcon",
        dict(hidden_size=4544, num_attention_heads=71, max_position_embeddings=2048, alibi=False),
        10000.0,
        None,
    ),
    "deepseek-v3-rope": (
        "deepseek_v3",
        dict(
            hidden_size=7168,
            num_attention_heads=128,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            max_position_embeddings=163840,
        ),
        10000.0,
        (
            "yarn",
            {
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
    ),
    "gpt-j-rope": ("gptj", dict(n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048), None, None),
    "phi3-mini-128k-rope": (
        "phi3",
        dict(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072),
        10000.0,
        (
            "longrope",
            {
                "original_max_position_embeddings": 4096,
                **{
                    k: PRESETS["phi3-mini-128k-rope"].params["scaling_params"][k]
                    for k in ("short_factor", "long_factor")
                },
            },
        ),
    ),
    "gpt-neox-rope": (
        "gpt_neox",
        dict(hidden_size=4096, num_attention_heads=32, rotary_pct=0.25, max_position_embeddings=2048),
        10000.0,
        None,
    ),
}


def write_config(folder, preset, style):
    model_type, top, theta, scaling = FAMILIES[preset]
    cfg = {"model_type": model_type, **top}
    if style == "old":
        if theta is not None:
            cfg["rotary_emb_base" if model_type == "gpt_neox" else "rope_theta"] = theta
        if scaling:
            cfg["rope_scaling"] = {"type": scaling[0], **scaling[1]}
    elif theta is not None or scaling:
        rope = {"rope_type": scaling[0] if scaling else "default", **(scaling[1] if scaling else {})}
        if theta is not None:
            rope["rope_theta"] = theta
        cfg["rope_parameters"] = rope
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("style", ["old", "new"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_config_gives_the_preset(tmp_path, preset, style):
    path = write_config(tmp_path / preset, preset, style)
    params = rope_params_from_config(path)
    want = PRESETS[preset].params
    assert RopeParams(**params) == RopeParams(**want), (params, want)


def test_every_preset_has_a_config_family():
    assert set(FAMILIES) == {name for name, p in PRESETS.items() if p.encoding == "rope"}


@pytest.mark.parametrize(
    "preset,style,module,cls",
    [
        ("llama3.1-rope", "new", "llama", "LlamaRotaryEmbedding"),
        ("llama3.1-rope", "old", "llama", "LlamaRotaryEmbedding"),
        ("qwen2.5-yarn-rope", "old", "qwen2", "Qwen2RotaryEmbedding"),
        ("gpt-neox-rope", "old", "gpt_neox", "GPTNeoXRotaryEmbedding"),
    ],
)
def test_transformers_reads_the_same_file_the_same_way(tmp_path, preset, style, module, cls):
    """The same config.json through transformers' AutoConfig and the model's own rotary class."""
    import importlib

    transformers = pytest.importorskip("transformers")
    path = write_config(tmp_path / preset, preset, style)
    config = transformers.AutoConfig.from_pretrained(str(path.parent))
    rotary = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)(config)
    ours, factor = inv_freq(RopeParams(**{**rope_params_from_config(path), "angles": "float32"}))
    np.testing.assert_array_equal(ours.astype(np.float32), rotary.inv_freq.numpy())  # exact: elementwise float32 ops
    assert factor == pytest.approx(rotary.attention_scaling, rel=1e-15)


def test_phi3_style_top_level_original_max(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "hidden_size": 3072,
                "num_attention_heads": 32,
                "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096,
                "rope_theta": 10000.0,
                "rope_scaling": {"type": "yarn", "factor": 32.0},
            }
        )
    )
    params = rope_params_from_config(path, max_positions=8192)
    assert params["head_dim"] == 96 and params["max_positions"] == 8192
    assert params["scaling_params"] == {"factor": 32.0, "original_max_positions": 4096}


def test_phi3_longrope_config(tmp_path):
    """Phi-3-mini-128k's layout: old 'su' type, original length at the top level, no factor (derived as
    max_position_embeddings / original = 32, giving the attention factor 1.1902381 of section 10)."""
    path = tmp_path / "config.json"
    short, long = [1.0 + i / 100 for i in range(48)], [1.0 + i / 10 for i in range(48)]
    path.write_text(
        json.dumps(
            {
                "model_type": "phi3",
                "hidden_size": 3072,
                "num_attention_heads": 32,
                "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096,
                "rope_theta": 10000.0,
                "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long},
            }
        )
    )
    params = rope_params_from_config(path, max_positions=8192)
    assert params["scaling"] == "longrope" and params["head_dim"] == 96
    assert params["scaling_params"] == {
        "short_factor": short,
        "long_factor": long,
        "original_max_positions": 4096,
        "factor": 32.0,
    }
    assert inv_freq(RopeParams(**params))[1] == pytest.approx(1.1902381, abs=1e-7)


def test_proportional_config_keeps_the_whole_head(tmp_path):
    """Gemma 4 style: partial_rotary_factor belongs to the rule; the export rotates all of D with zeros
    in the tail frequencies, and transformers' rule gives the same inv_freq from the same keys."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    transformers = pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    rope = {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25, "factor": 1.0}
    path.write_text(
        json.dumps({"head_dim": 256, "hidden_size": 1024, "num_attention_heads": 4, "rope_parameters": rope})
    )
    params = rope_params_from_config(path, max_positions=64)
    assert "rotary_dim" not in params and params["scaling_params"] == {"partial_rotary_factor": 0.25, "factor": 1.0}
    config = transformers.LlamaConfig(head_dim=256, hidden_size=1024, num_attention_heads=4, rope_parameters=dict(rope))
    hf, _ = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu")
    ours, _ = inv_freq(RopeParams(**{**params, "angles": "float32"}))
    np.testing.assert_array_equal(ours.astype(np.float32), hf.numpy())  # exact: elementwise float32 ops
    assert (ours[32:] == 0).all() and (ours[:32] > 0).all()


def test_dynamic_config_scales_from_max_position_embeddings(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "max_position_embeddings": 4096,
                "rope_theta": 10000.0,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
            }
        )
    )
    params = rope_params_from_config(path)
    assert params["scaling_params"] == {"factor": 2.0, "original_max_positions": 4096}
    assert params["max_positions"] == 8192  # factor * L by default: a table of L would never scale
    assert rope_params_from_config(path, max_positions=16384)["max_positions"] == 16384


runner = CliRunner()


@pytest.mark.parametrize("mode", [None, "long"])
def test_from_config_longrope_records_its_mode(tmp_path, mode):
    from pe_export.pipeline.onnx_export import load

    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "hidden_size": 384,
                "num_attention_heads": 4,
                "max_position_embeddings": 512,
                "original_max_position_embeddings": 128,
                "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
            }
        )
    )
    out = tmp_path / "p.onnx"
    args = ["from-config", str(path), "-o", str(out)] + (["--longrope-mode", mode] if mode else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load(out)[1].params["scaling_params"]["mode"] == (mode or "runtime")


def test_longrope_mode_needs_the_longrope_rule(tmp_path):
    result = runner.invoke(
        app, ["llama-rope", "--seq", "64", "--longrope-mode", "long", "-o", str(tmp_path / "x.onnx")]
    )
    assert (
        result.exit_code == 2
        and "--longrope-mode applies to the longrope scaling rule; this export uses 'default'" in result.output
    )
    assert not (tmp_path / "x.onnx").exists()


def test_from_config_prints_the_parameters_and_exports(tmp_path):
    path = write_config(tmp_path / "Llama-3.1-8B", "llama3.1-rope", "old")
    out = tmp_path / "l.onnx"
    result = runner.invoke(app, ["from-config", str(path), "--seq", "2048", "-o", str(out), "--op", "decomposed"])
    assert result.exit_code == 0, result.output
    assert "scaling=llama3" in result.output and "max_positions=2048" in result.output and out.exists()


BAD = [
    ("not-json", "{", "is not valid JSON"),
    ("a-list", "[1, 2]", "must hold a JSON object, got list"),
    ("no-heads", json.dumps({"hidden_size": 4096}), "has no 'head_dim', nor 'hidden_size' and 'num_attention_heads'"),
    (
        "theta-text",
        json.dumps({"head_dim": 64, "rope_theta": "big"}),
        "config key 'rope_theta' must be a number, got 'big'",
    ),
    ("head-dim-float", json.dumps({"head_dim": 64.5}), "config key 'head_dim' must be an integer, got 64.5"),
    (
        "mrope",
        # "mrope" with no mrope_section: nothing says how to split the pairs (with one: tests/test_mrope.py).
        json.dumps({"head_dim": 128, "rope_scaling": {"type": "mrope"}}),
        "unsupported rope_type 'mrope'",
    ),
    (
        "unknown-type",
        json.dumps({"head_dim": 64, "rope_scaling": {"type": "mystery", "factor": 2.0}}),
        "unsupported rope_type 'mystery'; supported: default, dynamic, linear, llama3, longrope, ntk, proportional, "
        "yarn",
    ),
    (
        "longrope-short",
        json.dumps(
            {
                "head_dim": 96,
                "original_max_position_embeddings": 32,
                "max_position_embeddings": 64,
                "rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0] * 48},
            }
        ),
        "short_factor must be a list of rotary_dim/2 = 48 numbers, got 1",
    ),
    (
        "longrope-text",
        json.dumps({"head_dim": 96, "rope_scaling": {"type": "longrope", "short_factor": [1.0, "x"]}}),
        "key 'short_factor[1]' must be a number, got 'x'",
    ),
    (
        "factor-text",
        json.dumps({"head_dim": 64, "rope_scaling": {"type": "linear", "factor": "2"}}),
        "rope_type 'linear' key 'factor' must be a number, got '2'",
    ),
    (
        "stray-key",
        json.dumps({"head_dim": 64, "rope_scaling": {"type": "linear", "factor": 2.0, "fctor": 3}}),
        "config scaling key 'fctor' is not a parameter of rope_type 'linear'",
    ),
    (
        "yarn-missing",
        json.dumps({"head_dim": 64, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}),
        "scaling rule 'yarn' needs 'original_max_positions'",
    ),
    ("odd-head", json.dumps({"head_dim": 63}), "head_dim must be even and >= 2, got 63"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_configs(tmp_path, name, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    result = runner.invoke(app, ["from-config", str(path), "--seq", "64", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pe-export: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_config_option_on_a_preset_command(tmp_path):
    """`--config` on a preset command takes the parameters from the file, as from-config does; the
    command's own options still override them."""
    from pe_export.pipeline.onnx_export import load

    path = write_config(tmp_path / "qwen", "qwen2.5-yarn-rope", "new")
    out = tmp_path / "q.onnx"
    result = runner.invoke(
        app, ["llama-rope", "--config", str(path), "--seq", "1024", "--theta", "20000", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    params = load(out)[1].params
    want = {**rope_params_from_config(path, max_positions=1024), "theta": 20000.0}
    assert RopeParams(**params) == RopeParams(**{**want, "tables": "constant"})
    assert params["scaling"] == "yarn" and params["head_dim"] == 128  # from the file, not llama-rope's preset
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = runner.invoke(app, ["llama-rope", "--config", str(bad), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "is not valid JSON" in result.output and not (tmp_path / "x.onnx").exists()
