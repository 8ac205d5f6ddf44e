"""The CLI through Typer's CliRunner, every example of README.md and docs/*.md, the bad-input contract, and one real
subprocess of the installed `pe-export` entry point."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.presets import LAYERED_PRESETS, PRESETS

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def invoke(*args, cwd=None):
    if cwd is None:
        return runner.invoke(app, list(args))
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, list(args))
    finally:
        os.chdir(old)


def test_list_shows_every_preset_with_its_parameters():
    result = invoke("list")
    assert result.exit_code == 0
    for name in PRESETS:
        assert name in result.output
    assert "theta=500000.0" in result.output and "rotary_dim=64" in result.output


def test_export_then_verify(tmp_path):
    out = tmp_path / "r.onnx"
    result = invoke("gpt-neox-rope", "--seq", "300", "-o", str(out), "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and re.search(r"ort-cpu\s+.\s+CPUExecutionProvider\s+.\s+\d", result.output)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "pass" and report["spec"]["params"]["max_positions"] == 300
    assert {r["runtime"] for r in report["rows"]} == {
        "torch",
        "ort-cpu",
        "ort-cpu-noopt",
        "ort-cuda",
        "onnx-reference",
        "openvino",
    }
    again = invoke("verify", str(out), "--providers", "cpu")
    assert again.exit_code == 0, again.output


def test_export_verifies_on_the_runtimes_asked_for(tmp_path):
    result = invoke("llama-rope", "--seq", "64", "--runtimes", "ort-cpu, torch", "--report", "r.json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["runtime"] for r in report["rows"]] == ["ort-cpu", "torch"] and report["verdict"] == "pass"


def test_a_preset_with_a_switch_past_its_table_says_so(tmp_path):
    """LongRoPE (and dynamic NTK) at run time switch past original_max_positions: a shorter table never does."""
    result = invoke("phi3-mini-128k-rope", "--seq", "4096", "--runtimes", "ort-cpu", cwd=tmp_path)
    assert result.exit_code == 0 and "never reaches the longrope rule's switch" in " ".join(result.output.split())
    result = invoke("phi3-mini-128k-rope", "--seq", "4097", "--runtimes", "ort-cpu", "--force", cwd=tmp_path)
    assert result.exit_code == 0 and "never reaches" not in result.output


def test_default_output_name_and_overrides(tmp_path):
    result = invoke(
        "llama2-rope",
        "--seq",
        "64",
        "--op",
        "decomposed",
        "--layout",
        "bshd",
        "--dtype",
        "fp16",
        "--head-dim",
        "32",
        "--theta",
        "5000",
        "--pairing",
        "interleaved",
        cwd=tmp_path,
    )
    assert result.exit_code == 0, result.output
    from pe_export.pipeline.onnx_export import load

    _, spec = load(tmp_path / "llama2-rope.onnx")
    assert (spec.op, spec.layout, spec.dtype, spec.opset) == ("decomposed", "bshd", "fp16", 17)
    assert spec.params["head_dim"] == 32 and spec.params["theta"] == 5000 and spec.params["pairing"] == "interleaved"


def test_scaling_overrides(tmp_path):
    from pe_export.pipeline.onnx_export import load

    out = tmp_path / "a.onnx"
    assert invoke("llama3.1-rope", "--seq", "256", "--scaling-param", "factor=4", "-o", str(out)).exit_code == 0
    assert load(out)[1].params["scaling_params"] == dict(
        factor=4, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192
    )
    out = tmp_path / "b.onnx"
    assert (
        invoke(
            "llama-rope", "--seq", "256", "--scaling", "linear", "--scaling-param", "factor=2.5", "-o", str(out)
        ).exit_code
        == 0
    )
    spec = load(out)[1]
    assert spec.params["scaling"] == "linear" and spec.params["scaling_params"] == {"factor": 2.5}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--scaling-param", "factor"], "--scaling-param takes KEY=VALUE, got 'factor'"),
        (["--scaling-param", "factor=abc"], "--scaling-param factor: VALUE must be JSON"),
        (["--scaling-param", "fctor=2"], "scaling rule 'llama3' has no parameter 'fctor'"),
        (["--scaling", "nope"], "unknown scaling rule 'nope'; known: default, dynamic"),
        (["--scaling", "yarn", "--scaling-param", "factor=4"], "scaling rule 'yarn' needs 'original_max_positions'"),
        (["--scaling-param", "factor=0.5"], "factor must be >= 1, got 0.5"),
    ],
)
def test_bad_scaling_overrides(tmp_path, args, message):
    result = invoke("llama3.1-rope", "--seq", "256", *args, "-o", str(tmp_path / "x.onnx"))
    assert result.exit_code == 2 and message in result.output, result.output
    assert_one_line_error(result)
    assert not (tmp_path / "x.onnx").exists()


def test_unverifiable_export_exits_1_and_keeps_the_file(tmp_path):
    out = tmp_path / "b.onnx"
    result = invoke("llama-rope", "--seq", "64", "--op", "ort", "--dtype", "bf16", "-o", str(out))
    assert result.exit_code == 1 and out.exists()
    assert "kept but unverified" in result.output


def test_parity_failure_exits_1_and_names_the_row(tmp_path):
    import onnx

    out = tmp_path / "c.onnx"
    assert invoke("llama-rope", "--seq", "64", "-o", str(out)).exit_code == 0
    model = onnx.load(out)
    table = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(table).copy()
    values[63, 0] = 5.0
    table.CopyFrom(onnx.numpy_helper.from_array(values, table.name))
    onnx.save(model, out)
    result = invoke("verify", str(out))
    assert result.exit_code == 1 and "parity check failed" in result.output and "position 63" in result.output


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_EXPORTS = [
    (["--seq", "0"], "--seq) must be >= 1, got 0"),
    (["--seq", "-1"], "must be >= 1, got -1"),
    (["--seq", "abc"], "'--seq'"),
    (["--seq", "64", "--head-dim", "127"], "head_dim must be even and >= 2, got 127"),
    (["--seq", "64", "--rotary-dim", "256"], "rotary_dim must be <= head_dim (128), got 256"),
    (["--seq", "64", "--theta", "0"], "theta must be a finite number > 0, got 0.0"),
    (["--seq", str(10**13)], "GiB of memory available"),
    (["--seq", "64", "--opset", "16"], "--op onnx takes an opset in [23, 25], got 16"),
    (["--seq", "64", "--opset", "26"], "--op onnx takes an opset in [23, 25], got 26"),
    (["--seq", "64", "--seed", "-1"], "'--seed'"),
    (["--seq", "64", "--report", "out.onnx"], "is the model file itself"),
    (["--seq", "64", "--layout", "half"], "'--layout'"),
    (["--seq", "64", "--runtimes", "ort-cpu,tpu"], "--runtimes takes a comma-separated list of torch, ort-cpu"),
]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("args,message", BAD_EXPORTS, ids=[" ".join(a) for a, _ in BAD_EXPORTS])
def test_bad_export_input(tmp_path, args, message):
    before = snapshot(tmp_path)
    result = invoke("llama-rope", *args, "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert_one_line_error(result)
    assert snapshot(tmp_path) == before


def assert_one_line_error(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pe-export: error: "), result.output
    assert "Traceback" not in result.output


def test_unknown_preset_lists_the_presets():
    result = invoke("llama-9000")
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert all(name in result.output for name in PRESETS)


def test_missing_output_folder(tmp_path):
    result = invoke("llama-rope", "--seq", "64", "-o", str(tmp_path / "nope" / "x.onnx"))
    assert result.exit_code == 2 and "does not exist" in result.output
    assert_one_line_error(result)
    assert not (tmp_path / "nope").exists()


def test_existing_file_needs_force(tmp_path):
    out = write(tmp_path / "x.onnx", b"precious")
    result = invoke("llama-rope", "--seq", "64", "-o", str(out))
    assert result.exit_code == 2 and "--force" in result.output
    assert_one_line_error(result)
    assert out.read_bytes() == b"precious" and snapshot(tmp_path) == {"x.onnx": b"precious"}
    assert invoke("llama-rope", "--seq", "64", "-o", str(out), "--force").exit_code == 0
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize(
    "name,make,message",
    [
        ("missing", lambda p: p, "does not exist"),
        ("empty", lambda p: write(p, b""), "is empty"),
        ("not-onnx", lambda p: write(p, b"hello, I am text\n"), "is not a valid ONNX model"),
        ("truncated", None, "is not a valid ONNX model"),
        ("no-spec", None, "has no pe_export.spec metadata"),
    ],
)
def test_bad_verify_input(tmp_path, name, make, message):
    import onnx

    path = tmp_path / f"{name}.onnx"
    if name == "truncated":
        good = tmp_path / "good.onnx"
        assert invoke("llama-rope", "--seq", "64", "-o", str(good)).exit_code == 0
        write(path, good.read_bytes()[:5000])
    elif name == "no-spec":
        model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
        onnx.save(model, path)
    else:
        make(path)
    before = snapshot(tmp_path)
    result = invoke("verify", str(path), "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert_one_line_error(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(layout="bogus"), "layout must be one of bhsd, bshd"),
        (dict(op="bogus"), "rope exports with --op onnx or ort or decomposed, got 'bogus'"),
        (dict(opset="x"), "takes an opset in"),
        (dict(encoding="cope"), "unknown encoding 'cope'"),
        (dict(encoding="alibi"), "alibi exports with --op decomposed, got 'onnx'"),
        (dict(params={"head_dim": 7, "max_positions": 64}), "head_dim must be even"),
        (dict(params={"head_dim": 64, "max_positions": 64, "foo": 1}), "unexpected keyword argument 'foo'"),
        (dict(params={"head_dim": 64, "max_positions": 10**13}), "GiB of memory available"),
        (dict(dtype="fp8"), "dtype must be one of"),
    ],
)
def test_verify_rejects_a_tampered_spec(tmp_path, change, message):
    import onnx

    good = tmp_path / "good.onnx"
    assert invoke("llama-rope", "--seq", "64", "-o", str(good)).exit_code == 0
    model = onnx.load(good)
    prop = next(p for p in model.metadata_props if p.key == "pe_export.spec")
    spec = json.loads(prop.value)
    spec.update(change)
    prop.value = json.dumps(spec)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    result = invoke("verify", str(bad))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert_one_line_error(result)


def test_verify_refuses_to_write_the_report_over_the_model(tmp_path):
    good = tmp_path / "good.onnx"
    assert invoke("llama-rope", "--seq", "64", "-o", str(good)).exit_code == 0
    before = good.read_bytes()
    result = invoke("verify", str(good), "--report", str(good), "--force")
    assert result.exit_code == 2 and "is the model file itself" in result.output
    assert good.read_bytes() == before


def test_export_parity_failure_exits_1_and_keeps_the_file(tmp_path, monkeypatch):
    import pe_export.verification.parity

    def failing_check(spec, data, runtimes, seed=0, **probes):
        return [
            pe_export.verification.parity.Row(
                runtime="ort-cpu", provider="CPUExecutionProvider", dtype="fp32", verdict="FAIL", note="planted"
            )
        ]

    monkeypatch.setattr(pe_export.verification.parity, "check", failing_check)
    out = tmp_path / "f.onnx"
    result = invoke("llama-rope", "--seq", "64", "-o", str(out))
    assert result.exit_code == 1 and out.exists()
    assert f"parity check failed; {out} is kept for inspection" in " ".join(result.output.split())


def test_head_dim_override_keeps_the_rotary_fraction(tmp_path):
    from pe_export.pipeline.onnx_export import load

    out = tmp_path / "n.onnx"
    assert invoke("gpt-neox-rope", "--seq", "64", "--head-dim", "64", "-o", str(out)).exit_code == 0
    assert load(out)[1].params["rotary_dim"] == 16  # 25% of 64, as 32 is of 128


def test_verify_rejects_unknown_providers(tmp_path):
    result = invoke("verify", str(tmp_path / "x.onnx"), "--providers", "tpu")
    assert result.exit_code == 2 and "cpu, cuda" in result.output


def shell_commands(page: Path) -> list[str]:
    """The `pe-export ...` lines of a Markdown page's shell blocks."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S)
    lines = [line.strip().removeprefix("$ ") for block in blocks for line in block.splitlines()]
    commands = []
    for line in lines:
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("pe-export") and part not in commands:
                commands.append(part)
    return commands


def example_commands() -> dict[str, list[str]]:
    """{page: its `pe-export` commands} over README.md and docs/*.md, each command at its first occurrence
    only (README first), so that a command shown on two pages runs once."""
    seen, found = set(), {}
    for page in DOC_PAGES:
        commands = [c for c in shell_commands(page) if c not in seen]
        seen.update(commands)
        if commands:
            found[page.name] = commands
    return found


# Run once into the folder every page's examples start from: the files later examples read (and both are
# examples themselves), plus the inputs the pages name (a Llama 3.1 config.json, a model and its config).
SHARED_EXAMPLES = ("pe-export llama-rope --seq 8192", "pe-export verify llama-rope.onnx --report llama-rope.json")
LLAMA31_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def run_example(command: str, cwd: Path) -> None:
    result = invoke(*shlex.split(command, comments=True)[1:], cwd=cwd)
    assert result.exit_code == 0, f"{command}\n{result.output}"


@pytest.fixture(scope="session")
def examples_folder(tmp_path_factory) -> Path:
    import onnx

    sys.path.insert(0, str(Path(__file__).parent))
    import fused_models as fm

    folder = tmp_path_factory.mktemp("examples")
    config = folder / "models" / "Llama-3.1-8B" / "config.json"  # the file the from-config examples read
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps(LLAMA31_CONFIG))
    # `pe-export rewrite model.onnx --config config.json`: a small graph with a fused RoPE node whose
    # float32 caches are built as onnxruntime-genai builds them, and its config.json
    onnx.save(fm.FUSED["com.microsoft::RotaryEmbedding"](fm.Rope()), folder / "model.onnx")
    fm.config(folder, fm.Rope())
    for command in SHARED_EXAMPLES:
        run_example(command, folder)
    return folder


def test_the_docs_have_examples_and_the_shared_ones_among_them():
    commands = [c for page in example_commands().values() for c in page]
    assert "README.md" in example_commands() and set(SHARED_EXAMPLES) <= set(commands)
    assert any(c.startswith("pe-export rewrite ") for c in example_commands()["README.md"])


EXAMPLES = [(page, c) for page, commands in example_commands().items() for c in commands if c not in SHARED_EXAMPLES]


@pytest.mark.parametrize(
    ("page", "command"), EXAMPLES, ids=[f"{p}: {shlex.join(shlex.split(c, comments=True))}" for p, c in EXAMPLES]
)
def test_docs_example_runs(page, command, examples_folder, tmp_path):
    """Each example in a copy of the shared folder (every example reads only what it holds), so that
    pytest-xdist spreads them over its workers."""
    work = tmp_path / "work"
    shutil.copytree(examples_folder, work)
    run_example(command, work)


def test_installed_entry_point_runs_as_a_subprocess(tmp_path):
    exe = shutil.which("pe-export") or pytest.fail("the pe-export console script is not installed")
    files = []
    for run in ("a", "b"):  # the same command twice, in separate processes: byte-identical files
        (tmp_path / run).mkdir()
        done = subprocess.run(
            [exe, "llama-rope", "--seq", "128"], cwd=tmp_path / run, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verified" in done.stdout
        files.append((tmp_path / run / "llama-rope.onnx").read_bytes())
    assert files[0] == files[1]
    bad = subprocess.run([exe, "llama-rope", "--seq", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_ci_runs_the_readme_test_command():
    test_command = (
        'pip install "torch==2.13.0" -e ".[cpu,test]" && npm ci --prefix js '
        "&& ruff format --check . && ruff check . && python -m pytest"
    )
    assert test_command in README.read_text()
    assert test_command in (README.parent / ".ci" / "run").read_text().splitlines()


# --------------------------------------------------------------------------------------------------
# The other encodings: every preset from the CLI, learned weights from files, their bad input.

OTHER_PRESETS = [name for name, p in PRESETS.items() if p.encoding not in ("rope", "mrope")]  # mrope: test_mrope.py


@pytest.mark.parametrize("preset", OTHER_PRESETS)
def test_every_other_preset_exports_and_verifies(tmp_path, preset):
    result = invoke(preset, "--seq", "64", "--dtype", "fp16", "--report", str(tmp_path / "r.json"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "pass" and report["spec"]["encoding"] == PRESETS[preset].encoding
    assert {r["runtime"]: r["verdict"] for r in report["rows"]}["ort-cpu"] == "pass"
    assert invoke("verify", str(tmp_path / f"{preset}.onnx"), "--providers", "cpu").exit_code == 0


def test_generic_options_override_the_preset(tmp_path):
    result = invoke(
        "t5-decoder-bias",
        "--seq",
        "100",
        "--heads",
        "3",
        "--num-buckets",
        "16",
        "--max-distance",
        "40",
        "--bidirectional",
        "--weights-seed",
        "7",
        "--attention",
        "--attention-head-dim",
        "16",
        cwd=tmp_path,
    )
    assert result.exit_code == 0, result.output
    from pe_export.pipeline.onnx_export import load

    _, spec = load(tmp_path / "t5-decoder-bias.onnx")
    assert spec.params == dict(
        heads=3,
        num_buckets=16,
        max_distance=40,
        bidirectional=True,
        max_positions=100,
        weights_seed=7,
        attention=True,
        attention_head_dim=16,
    )


def write_weights(path, tensor, key="wpe.weight"):
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({key: tensor}, path)
    else:
        torch.save({key: tensor}, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_learned_weights_from_a_file(tmp_path, suffix):
    import numpy as np
    import torch

    w, tensor = tmp_path / f"gpt2{suffix}", torch.randn(300, 48)
    write_weights(w, tensor)
    # A shape other than the preset's (1024, 768) is exported when it is asked for (else refused: test_bad_input.py).
    result = invoke(
        "gpt2-learned", "--weights", str(w), "--key", "wpe.weight", "--rows", "300", "--dim", "48", cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    from conftest import ort_cpu_session

    from pe_export.pipeline.onnx_export import load

    model, spec = load(tmp_path / "gpt2-learned.onnx")
    assert (spec.params["rows"], spec.params["dim"], spec.params.get("max_positions")) == (300, 48, None)
    got = ort_cpu_session(model.SerializeToString()).run(None, {"position_ids": np.array([[0, 299]])})[0]
    assert np.array_equal(got[0], tensor.numpy()[[0, 299]])  # the file's float32 rows, exactly (a Gather)
    # verify re-reads the file; moved, it is found with --weights; changed, it is refused.
    assert invoke("verify", str(tmp_path / "gpt2-learned.onnx"), "--providers", "cpu").exit_code == 0
    moved = tmp_path / f"moved{suffix}"
    shutil.move(w, moved)
    gone = invoke("verify", str(tmp_path / "gpt2-learned.onnx"))
    assert gone.exit_code == 2 and "does not exist" in gone.output
    assert (
        invoke("verify", str(tmp_path / "gpt2-learned.onnx"), "--weights", str(moved), "--providers", "cpu").exit_code
        == 0
    )
    write_weights(moved, torch.randn(300, 48))
    changed = invoke("verify", str(tmp_path / "gpt2-learned.onnx"), "--weights", str(moved))
    assert changed.exit_code == 2 and "is not the one this file was exported with" in changed.output
    assert_one_line_error(changed)


def test_learned_seq_is_at_most_the_table(tmp_path):
    import torch

    write_weights(tmp_path / "w.pt", torch.randn(100, 8))
    size = ["--rows", "100", "--dim", "8"]
    ok = invoke(
        "bert-learned", "--weights", str(tmp_path / "w.pt"), "--key", "wpe.weight", *size, "--seq", "60", cwd=tmp_path
    )
    assert ok.exit_code == 0, ok.output
    too_long = invoke(
        "bert-learned",
        "--weights",
        str(tmp_path / "w.pt"),
        "--key",
        "wpe.weight",
        *size,
        "--seq",
        "101",
        "--force",
        cwd=tmp_path,
    )
    assert too_long.exit_code == 2 and "at most the table's 100 rows, got 101" in too_long.output


def bad_weights(tmp_path):
    import torch

    torch.save({"table": torch.zeros(7, 12)}, tmp_path / "t5.pt")  # (num_buckets, heads) wants (32, 12)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04 junk")
    return [
        (["bert-learned", "--weights", str(tmp_path / "none.pt"), "--key", "k"], "does not exist"),
        (
            ["bert-learned", "--weights", str(tmp_path / "junk.pt"), "--key", "k"],
            "is not a .safetensors file or a torch state dict",
        ),
        (
            ["bert-learned", "--weights", str(tmp_path / "t5.pt"), "--key", "nope"],
            "has no tensor 'nope'; it has: table",
        ),
        (["bert-learned", "--weights", str(tmp_path / "t5.pt")], "--weights FILE and --key NAME go together"),
        (
            ["t5-bias", "--weights", str(tmp_path / "t5.pt"), "--key", "table"],
            "has shape (7, 12), want (32, 12) (num_buckets, heads)",
        ),
        (["bloom-alibi", "--heads", "0"], "heads must be an integer >= 1, got 0"),
        (["t5-bias", "--num-buckets", "32", "--max-distance", "8"], "max_distance must be > 8"),
        (["t5-bias", "--attention-head-dim", "8"], "need --attention"),
        (["t5-bias", "--attention", "--attention-causal"], "sets causal masking by its own mode"),
        (["llama-rope", "--attention", "--layout", "bshd"], "rope --attention takes --layout bhsd, got 'bshd'"),
        (["bloom-alibi", "--op", "onnx"], "alibi exports with --op decomposed, got 'onnx'"),
        (
            ["vaswani-sinusoidal", "--layout-variant", "paper"],
            "layout_variant must be one of interleaved, concat, tensor2tensor",
        ),
    ]


def test_bad_input_of_the_other_encodings(tmp_path):
    for args, message in bad_weights(tmp_path):
        before = snapshot(tmp_path)
        result = invoke(*args, "--seq", "64", cwd=tmp_path)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert_one_line_error(result)
        assert snapshot(tmp_path) == before, args


def test_help_groups_the_commands_in_panels_most_used_first():
    """--help: whole models, then checks, then exports (from-config, list, every preset, built or lazy)."""
    text = invoke("--help").output
    panels = [text.index(name) for name in ("Whole models", "Checks", "Exports")]
    assert panels == sorted(panels)
    whole, checks, exports = (text[a:b] for a, b in zip(panels, [*panels[1:], len(text)]))
    names = lambda panel: [line.split()[1] for line in panel.splitlines() if line.startswith("│ ") and line[2] != " "]  # noqa: E731
    assert names(whole) == ["rewrite"]
    assert names(checks) == ["verify", "matrix", "inspect", "bench", "plot"]
    assert names(exports) == ["from-config", "list", *PRESETS, *LAYERED_PRESETS]


def test_help_and_list_import_no_torch():
    """The presets of other encodings are built when named: --help and list load neither torch nor onnx."""
    import subprocess
    import sys

    code = (
        "import sys; from pe_export.cli.main import app\n"
        "from typer.testing import CliRunner\n"
        "for args in (['--help'], ['list']): assert CliRunner().invoke(app, args).exit_code == 0\n"
        "print('torch' in sys.modules, 'onnx' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_a_lazy_preset_shows_its_own_options():
    result = invoke("t5-bias", "--help")
    assert result.exit_code == 0 and "--num-buckets" in result.output
