"""Bad input found by trying the project as a new user would (issue 13, section 4): each exits 2 from the
CLI with one line naming the parameter and its valid range, writes nothing, and raises ValueError (or
BadInput) with the same message from Python. Generated from the registries where the input is per encoding."""

import re

import pytest
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.encodings import ENCODINGS
from pe_export.presets import PRESETS

runner = CliRunner()


def refused(tmp_path, *args) -> str:
    """Run the CLI in an empty folder; assert exit 2, one line on stderr, no traceback, nothing written;
    return the line."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # empty, one per call
    old = os.getcwd()
    os.chdir(folder)
    try:
        result = runner.invoke(app, list(args))
    finally:
        os.chdir(old)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("pe-export: error: "), result.output
    assert "Traceback" not in result.output and not result.stdout.strip(), result.output
    assert not list(folder.iterdir()), list(folder.iterdir())
    return lines[0]


def first_preset(encoding: str):
    return next(p for p in PRESETS.values() if p.encoding == encoding)


# ------------------------------------------------------------------------------------------------
# A huge --seq: one size check for every encoding


HUGE = 10**12


# Shaw's graph holds no per-position table and its probes do not grow with --seq: it exports at 10^12
# positions (its float32 logits are then checked as any others).
NO_TABLE = {"shaw"}
SIZED = [name for name in ENCODINGS.names() if name not in NO_TABLE]
# "the table's N rows": learned tables keep at most the rows they have (the rows are size-checked below).
TOO_LONG = r"max_positions \(--seq\) must be at most (the table's )?\d+"


@pytest.mark.parametrize("encoding", SIZED)
def test_every_encoding_refuses_a_table_that_cannot_fit(encoding):
    params = first_preset(encoding).params | {"max_positions": HUGE}
    with pytest.raises(ValueError, match=TOO_LONG + f".*got {HUGE}"):
        ENCODINGS.get(encoding).params(**params)


@pytest.mark.parametrize("encoding", SIZED)
def test_every_encoding_refuses_a_huge_seq_from_the_cli(tmp_path, encoding):
    line = refused(tmp_path, first_preset(encoding).name, "--seq", str(HUGE), "-o", "x.onnx")
    assert re.search(TOO_LONG, line) and f"got {HUGE}" in line, line


def test_a_table_over_one_onnx_file_is_refused_with_the_largest_that_fits():
    from pe_export.encodings.size import PROTOBUF_LIMIT

    P = PROTOBUF_LIMIT // (4 * 12) + 1  # KERPLE: (P, H) float32
    with pytest.raises(ValueError, match=rf"max_positions \(--seq\) must be at most ({P - 1} |\d+ with the )"):
        ENCODINGS.get("kerple").params(heads=12, max_positions=P)


def test_a_huge_learned_table_is_refused():
    from pe_export.encodings.learned import LearnedParams

    with pytest.raises(ValueError, match=r"rows must be at most \d+ .*, got 1000000000000"):
        LearnedParams(dim=768, rows=HUGE)


def test_the_sizes_the_presets_use_fit():
    for preset in PRESETS.values():
        ENCODINGS.get(preset.encoding).params(**preset.params)


# ------------------------------------------------------------------------------------------------
# --scaling-param values of the wrong type, or not finite: refused as from-config refuses them


def llama31_config(tmp_path, **scaling) -> str:
    """Llama 3.1's config.json with its rope_scaling block changed by `scaling` (values as JSON text)."""
    block = {
        "rope_type": '"llama3"',
        "factor": "8.0",
        "low_freq_factor": "1.0",
        "high_freq_factor": "4.0",
        "original_max_position_embeddings": "8192",
    } | scaling
    text = ", ".join(f'"{k}": {v}' for k, v in block.items())
    path = tmp_path / "config.json"
    path.write_text(
        f'{{"model_type": "llama", "head_dim": 128, "rope_theta": 500000.0, '
        f'"max_position_embeddings": 131072, "rope_scaling": {{{text}}}}}'
    )
    return str(path)


BAD_FACTORS = {  # --scaling-param factor=VALUE, VALUE as JSON: what the rule's parameter got
    "Infinity": "inf",
    "-Infinity": "-inf",
    "NaN": "nan",
    "true": "True",
    '"4"': "'4'",
    "[4]": "[4]",
    "null": "None",
}


@pytest.mark.parametrize("value", BAD_FACTORS)
def test_a_scaling_param_of_the_wrong_type_is_refused_by_both_paths(tmp_path, value):
    import json

    from pe_export.encodings.rope import RopeParams
    from pe_export.presets import PRESETS

    want = f"scaling rule 'llama3' parameter 'factor' must be a finite number, got {BAD_FACTORS[value]}"
    line = refused(tmp_path, "llama3.1-rope", "--seq", "256", "--scaling-param", f"factor={value}", "-o", "x.onnx")
    assert line == f"pe-export: error: {want}", line
    params = PRESETS["llama3.1-rope"].params
    with pytest.raises(ValueError) as e:
        RopeParams(**params | {"scaling_params": params["scaling_params"] | {"factor": json.loads(value)}})
    assert str(e.value) == want
    if value != "null":  # from-config skips null keys, as transformers reads them as unset
        line = refused(tmp_path, "from-config", llama31_config(tmp_path, factor=value), "--seq", "256", "-o", "x.onnx")
        assert "'factor'" in line and ("finite" in line or "a number" in line), line


@pytest.mark.parametrize(
    "key,value,what",
    [
        ("original_max_positions", "8192.5", "an integer"),
        ("original_max_positions", "true", "an integer"),
        ("low_freq_factor", '"1"', "a finite number"),
    ],
)
def test_scaling_params_are_checked_by_their_type(tmp_path, key, value, what):
    line = refused(tmp_path, "llama3.1-rope", "--seq", "256", "--scaling-param", f"{key}={value}", "-o", "x.onnx")
    assert f"parameter {key!r} must be {what}, got" in line, line


@pytest.mark.parametrize("rule", __import__("pe_export.scaling", fromlist=["SCALING_RULES"]).SCALING_RULES.names())
def test_every_scaling_rule_parameter_says_its_type(rule):
    """The check reads the rules' annotations: a rule added without them would go unchecked."""
    import inspect

    from pe_export.scaling import PARAM_KINDS, rule_params

    for name, param in rule_params(rule).items():
        assert param.annotation is not inspect.Parameter.empty, f"{rule}: {name} has no annotation"
        kinds = [a for a in getattr(param.annotation, "__args__", (param.annotation,)) if a is not type(None)]
        assert len(kinds) == 1 and kinds[0] in PARAM_KINDS, f"{rule}: {name}: {param.annotation}"


# ------------------------------------------------------------------------------------------------
# from-config: zero is a value, not "unset"


@pytest.mark.parametrize(
    "key,value,want",
    [
        ("rope_theta", "0", "config key 'rope_theta' must be > 0, got 0.0"),
        ("rope_theta", "-10000", "config key 'rope_theta' must be > 0, got -10000.0"),
        ("max_position_embeddings", "0", "config key 'max_position_embeddings' must be >= 1, got 0"),
        ("max_position_embeddings", "-5", "config key 'max_position_embeddings' must be >= 1, got -5"),
    ],
)
def test_from_config_refuses_zero_instead_of_a_default(tmp_path, key, value, want):
    from pe_export.errors import BadInput
    from pe_export.hf_config import rope_params_from_config

    path = tmp_path / "config.json"
    cfg = {"model_type": '"llama"', "head_dim": "64", "rope_theta": "10000.0", "max_position_embeddings": "4096"} | {
        key: value
    }
    path.write_text("{" + ", ".join(f'"{k}": {v}' for k, v in cfg.items()) + "}")  # values as JSON text
    line = refused(tmp_path, "from-config", str(path), "-o", "x.onnx")
    assert line == f"pe-export: error: {want}", line
    with pytest.raises(BadInput) as e:
        rope_params_from_config(path)
    assert str(e.value) == want


# ------------------------------------------------------------------------------------------------
# A learned table whose shape is not the preset's: refused unless the size is given


def test_a_weights_tensor_of_another_shape_than_the_preset_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pe_export.encodings.learned import LearnedParams, table

    w = tmp_path / "W.safetensors"
    save_file({"wpe.weight": torch.randn(1024, 100)}, w)
    line = refused(tmp_path, "gpt2-learned", "--weights", str(w), "--key", "wpe.weight", "-o", "x.onnx")
    want = (
        f"tensor 'wpe.weight' of {str(w.resolve())!r} has shape (1024, 100), want (1024, 768) (rows, dim); "
        f"set rows and dim (--rows 1024 --dim 100) to export that shape"
    )
    assert line == f"pe-export: error: {want}", line
    with pytest.raises(ValueError) as e:
        table(LearnedParams(dim=768, rows=1024, weights=str(w.resolve()), key="wpe.weight"))
    assert str(e.value) == want
    # Sizes given: the file's shape is what was asked for.
    ok = runner.invoke(
        app,
        [
            "gpt2-learned",
            "--weights",
            str(w),
            "--key",
            "wpe.weight",
            "--dim",
            "100",
            "--seq",
            "64",
            "--runtimes",
            "ort-cpu",
            "-o",
            str(tmp_path / "ok.onnx"),
        ],
    )
    assert ok.exit_code == 0 and (tmp_path / "ok.onnx").exists(), ok.output


# ------------------------------------------------------------------------------------------------
# A parameter of the wrong JSON type (a tampered spec): named with the type it takes, for every encoding


def typed_fields():
    import dataclasses

    from pe_export.encodings.param_types import expected

    for name in ENCODINGS.names():
        cls = ENCODINGS.get(name).params
        for f in dataclasses.fields(cls):
            kinds = expected(f.type)
            if kinds and ("float" in kinds or "int" in kinds):
                yield pytest.param(name, f.name, id=f"{name}.{f.name}")


@pytest.mark.parametrize("encoding,field", list(typed_fields()))
def test_every_numeric_parameter_given_a_string_is_named(encoding, field):
    from pe_export.spec import Spec

    enc = ENCODINGS.get(encoding)
    base = first_preset(encoding)
    spec = Spec(encoding=encoding, params=dict(base.params) | {field: "12"}, op=enc.ops[0])
    with pytest.raises(TypeError) as e:
        enc.parse(spec)
    assert str(e.value).startswith(f"{field} must be ") and "got '12' (str)" in str(e.value), e.value
