"""`pe-export plot`: every kind renders a valid PNG of the size asked for (640 x 480 px a panel, two panels
a row), the drawn data equals values computed here from the papers' formulas, and bad sources, an
existing output and a missing matplotlib are one-line errors with exit code 2."""

import json
import struct
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("matplotlib")

from pe_export.cli.main import app  # noqa: E402
from pe_export.encodings import ENCODINGS  # noqa: E402
from pe_export.presets import PRESETS  # noqa: E402
from pe_export.spec import Spec  # noqa: E402
from pe_export.tools import plot  # noqa: E402

runner = CliRunner()
PANEL = (640, 480)  # 6.4 x 4.8 inches at 100 dpi


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def grid(n: int) -> tuple[int, int]:
    """Pixels of n panels laid out two a row."""
    cols = min(n, 2)
    return PANEL[0] * cols, PANEL[1] * -(-n // cols)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output  # stdout and stderr together


# One preset per encoding, taken from the registries: those with a plot, and those without.
def _one_preset_per_encoding(with_plot: bool):
    seen = {}
    for p in PRESETS.values():
        if bool(plot.kinds_for(plot.Source(p.name, spec=Spec(encoding=p.encoding, params=p.params)))) == with_plot:
            seen.setdefault(p.encoding, p.name)
    return sorted(seen.values())


HEATMAP_PANELS = {"rope": 2}  # cos and sin; absolute: 1; bias: min(heads, 4) panels


@pytest.mark.parametrize("preset", _one_preset_per_encoding(with_plot=True))
def test_heatmap_png_of_every_encoding(preset, tmp_path):
    out = tmp_path / "h.png"
    result, text = invoke("plot", preset, "-o", out, "--kind", "heatmap", "--seq", 64)
    assert result.exit_code == 0, text
    enc = ENCODINGS.get(PRESETS[preset].encoding)
    n = HEATMAP_PANELS.get(enc.name) or (1 if enc.kind == "absolute" else min(PRESETS[preset].params["heads"], 4))
    assert png_size(out.read_bytes()) == grid(n)


@pytest.mark.parametrize("preset", _one_preset_per_encoding(with_plot=False))
def test_encodings_without_a_plot_say_so(preset, tmp_path):
    result, text = invoke("plot", preset, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and f"no plot for {PRESETS[preset].encoding}" in text, text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_every_kind_of_a_rope_preset_in_one_figure(tmp_path):
    out = tmp_path / "all.png"
    result, text = invoke("plot", "llama3.1-rope", "-o", out, "--seq", 4096)
    assert result.exit_code == 0, text
    assert "heatmap, decay, frequencies" in text
    assert png_size(out.read_bytes()) == grid(4)  # cos, sin, decay, frequencies


@pytest.mark.parametrize("kind", ["decay", "frequencies"])
def test_rope_kind_png(kind, tmp_path):
    out = tmp_path / f"{kind}.png"
    result, text = invoke("plot", "gpt-neox-rope", "-o", out, "--kind", kind)
    assert result.exit_code == 0, text
    assert png_size(out.read_bytes()) == PANEL


def test_rope_heatmap_draws_the_cos_and_sin_tables():
    """Llama RoPE at 64 positions: cos/sin(p * 500000^(-2m/128)), from the paper's formula."""
    src = plot.resolve("llama-rope", seq=64)
    fig = plot.figure(src, ("heatmap",))
    p, m = np.arange(64)[:, None], np.arange(64)[None, :]
    angle = p * 500000.0 ** (-2 * m / 128)
    cos, sin = (np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images)
    # Angles up to 63 rad carry float64 rounding of a few ulp (7e-15 each) from torch's pow vs NumPy's.
    np.testing.assert_allclose(cos, np.cos(angle), rtol=0, atol=1e-13)
    np.testing.assert_allclose(sin, np.sin(angle), rtol=0, atol=1e-13)


def test_bias_heatmap_draws_alibi_with_its_mask():
    """bloom-alibi, 16 heads: head 0's slope is 2^-0.5 (Press: 2^(-8/16)); BLOOM's bias is slope * j,
    -inf (masked) above the diagonal."""
    fig = plot.figure(plot.resolve("bloom-alibi", seq=8), ("heatmap",))
    ax = fig.axes[0]
    assert "head 0 of 16" in ax.get_title()
    drawn = ax.images[0].get_array()
    i, j = np.arange(8)[:, None], np.arange(8)[None, :]
    np.testing.assert_array_equal(drawn.mask, j > i)
    np.testing.assert_allclose(drawn.filled(0), np.where(j > i, 0, 2**-0.5 * j), rtol=1e-7)  # float32 slopes
    titles = [a.get_title() for a in fig.axes if a.images]
    assert [t.split("head ")[1].split(" of")[0] for t in titles] == ["0", "5", "10", "15"]


def test_absolute_heatmap_draws_the_sinusoidal_table():
    """Vaswani's PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...), d = 512, 16 positions."""
    fig = plot.figure(plot.resolve("vaswani-sinusoidal", seq=16), ("heatmap",))
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    p, i = np.arange(16)[:, None], np.arange(256)[None, :]
    angle = p / 10000.0 ** (2 * i / 512)
    # Angles up to 15 rad: float64 rounding of a few ulp (2e-15 each).
    np.testing.assert_allclose(drawn[:, 0::2], np.sin(angle), rtol=0, atol=1e-13)
    np.testing.assert_allclose(drawn[:, 1::2], np.cos(angle), rtol=0, atol=1e-13)


def test_decay_curve_hand_values():
    # m = 0: every S_j = j, so the mean of |S_j| over j = 1..d/2 is (d/2 + 1) / 2.
    assert plot.decay_curve(np.zeros((1, 64)))[0] == pytest.approx(32.5, abs=1e-12)
    # Two frequencies 0.5 and 0.25 at m = 2: |S_1| = 1, |S_2| = |e^{i} + e^{0.5 i}| = 2 cos(0.25).
    assert plot.decay_curve(np.array([[1.0, 0.5]]))[0] == pytest.approx((1 + 2 * np.cos(0.25)) / 2, abs=1e-15)


def test_decay_panel_is_the_roformer_bound_of_the_specs_frequencies():
    """The drawn curve equals the paper's formula written with complex exponentials, for theta 10000,
    d = 128 (the paper's figure 2 setting)."""
    spec = Spec(encoding="rope", params={"head_dim": 128, "theta": 10000.0, "max_positions": 256})
    fig = plot.figure(plot.Source("paper", spec=spec), ("decay",))
    (line,) = fig.axes[0].get_lines()
    m = line.get_xdata().astype(np.float64)
    theta = 10000.0 ** (-2 * np.arange(64) / 128)
    S = np.cumsum(np.exp(1j * m[:, None] * theta[None, :]), axis=1)  # S_j for j = 1..64
    np.testing.assert_allclose(line.get_ydata(), np.abs(S).mean(axis=1), rtol=1e-12)
    assert m[0] == 1 and m[-1] == 255
    # The paper's point: the bound decays with distance (from 32.5 at m = 0).
    assert line.get_ydata()[-1] < line.get_ydata()[0] < 32.5


def test_frequencies_of_a_switching_rule_show_both_regimes():
    """LongRoPE: 1 / (factor_i * theta^(2i/R)) with the short factors, then the long ones."""
    short, long = [1.0, 1.0, 2.0, 4.0], [2.0, 3.0, 8.0, 16.0]
    params = {
        "head_dim": 8,
        "theta": 10000.0,
        "max_positions": 64,
        "scaling": "longrope",
        "scaling_params": {"short_factor": short, "long_factor": long, "original_max_positions": 16, "factor": 4.0},
    }
    fig = plot.figure(plot.Source("lr", spec=Spec(encoding="rope", params=params)), ("frequencies",))
    unscaled, s, lg = fig.axes[0].get_lines()
    base = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(unscaled.get_ydata(), base, rtol=1e-15)
    np.testing.assert_allclose(s.get_ydata(), base / short, rtol=1e-15)
    np.testing.assert_allclose(lg.get_ydata(), base / long, rtol=1e-15)
    assert "63" in lg.get_label()


def test_frequencies_of_llama3_match_meta_rule_at_the_ends():
    """Llama 3.1 (factor 8, wavelengths 2048..8192 smoothed): the highest frequency is kept, the lowest
    divided by 8."""
    fig = plot.figure(plot.resolve("llama3.1-rope", seq=64), ("frequencies",))
    unscaled, scaled = fig.axes[0].get_lines()
    assert scaled.get_ydata()[0] == unscaled.get_ydata()[0] == 1.0
    assert scaled.get_ydata()[-1] == pytest.approx(500000.0 ** (-126 / 128) / 8, rel=1e-14)


def _verify_report(tmp_path):
    from conftest import exported, rope_spec

    from pe_export.verification.parity import check, verdict
    from pe_export.verification.report import verify_doc

    spec = rope_spec(max_positions=64)
    rows = check(spec, exported(spec), runtimes=("torch", "ort-cpu"))
    path = tmp_path / "report.json"
    path.write_text(json.dumps(verify_doc("m.onnx", spec, rows, verdict(rows))))
    return path, rows


def test_error_plot_of_a_verify_report(tmp_path):
    report, rows = _verify_report(tmp_path)
    out = tmp_path / "err.png"
    result, text = invoke("plot", report, "-o", out)
    assert result.exit_code == 0, text
    assert png_size(out.read_bytes()) == PANEL
    fig = plot.figure(plot.resolve(str(report)), ("error",))
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    for r in rows:
        by = r.by_position
        drawn = lines[f"{r.runtime} max abs error"]
        assert list(drawn.get_xdata()) == by["positions"] and len(by["positions"]) == 64
        # exact: the plotted values are the report's own
        np.testing.assert_array_equal(drawn.get_ydata(), np.where(np.array(by["max_abs"]) > 0, by["max_abs"], np.nan))
    np.testing.assert_array_equal(lines["bound (every runtime)"].get_ydata(), rows[0].by_position["bound"])
    assert fig.axes[0].get_yscale() == "log"


def test_infinite_errors_are_marked(tmp_path):
    """A report row with infinite errors (null in the JSON) marks their positions along the top edge."""
    report, _ = _verify_report(tmp_path)
    doc = json.loads(report.read_text())
    by = doc["rows"][1]["by_position"]
    by["max_abs"][10] = None
    by["infinite"] = [10]
    report.write_text(json.dumps(doc))
    fig = plot.figure(plot.resolve(str(report)), ("error",))
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    marks = lines[f"{doc['rows'][1]['runtime']} infinite error"]
    assert list(marks.get_xdata()) == [10] and "torch infinite error" not in lines


def test_report_errors_are_one_line_exit_2(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(
        json.dumps(
            {"file": "m.onnx", "spec": {}, "verdict": "pass", "rows": [{"runtime": "ort-cpu", "by_position": {}}]}
        )
    )
    bad_len = tmp_path / "bad.json"
    bad_len.write_text(
        json.dumps(
            {"rows": [{"runtime": "x", "by_position": {"positions": [0, 1], "max_abs": [0.1], "bound": [1, 1]}}]}
        )
    )
    matrix = tmp_path / "matrix.json"
    matrix.write_text(json.dumps({"cases": [], "summary": {}}))
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    for path, words in (
        (bare, "no by_position"),
        (bad_len, "one length"),
        (matrix, "matrix report"),
        (junk, "not valid JSON"),
    ):
        result, text = invoke("plot", path, "-o", tmp_path / "x.png")
        assert result.exit_code == 2, text
        assert words in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "x.png").exists()


def test_plot_from_an_exported_file(tmp_path):
    from conftest import exported, rope_spec

    model = tmp_path / "m.onnx"
    model.write_bytes(exported(rope_spec(max_positions=64)))
    out = tmp_path / "m.png"
    result, text = invoke("plot", model, "-o", out)
    assert result.exit_code == 0, text
    assert png_size(out.read_bytes()) == grid(4)


def test_output_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "f.png"
    out.write_bytes(b"keep")
    result, text = invoke("plot", "llama-rope", "-o", out, "--kind", "frequencies")
    assert result.exit_code == 2 and "--force" in text
    assert out.read_bytes() == b"keep"
    result, text = invoke("plot", "llama-rope", "-o", out, "--kind", "frequencies", "--force")
    assert result.exit_code == 0, text
    assert png_size(out.read_bytes()) == PANEL


def test_same_input_same_bytes():
    src = plot.resolve("t5-bias", seq=32)
    assert plot.render(src, ("heatmap",)) == plot.render(src, ("heatmap",))


@pytest.mark.parametrize(
    "args, words",
    [
        (["no-such-preset"], "neither a preset nor an existing file"),
        (["llama-rope", "--seq", "0"], "max_positions (--seq) must be >= 1, got 0"),
        (["bloom-alibi", "--kind", "decay"], "--kind decay does not apply to alibi"),
        (["llama-rope", "--kind", "error"], "--kind error does not apply"),
        (["gpt2-learned", "--seq", "2000"], "max_positions (--seq) must be at most"),
    ],
)
def test_bad_source_is_one_line_exit_2(args, words, tmp_path):
    out = tmp_path / "x.png"
    result, text = invoke("plot", *args, "-o", out)
    assert result.exit_code == 2, text
    assert words in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists()


def test_bad_output_and_file_sources(tmp_path):
    result, text = invoke("plot", "llama-rope", "-o", tmp_path / "x.jpg")
    assert result.exit_code == 2 and ".png" in text
    result, text = invoke("plot", "llama-rope", "-o", tmp_path / "missing" / "x.png")
    assert result.exit_code == 2 and "does not exist" in text
    not_ours = tmp_path / "other.onnx"
    not_ours.write_bytes(b"")
    result, text = invoke("plot", not_ours, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "is empty" in text
    result, text = invoke("plot", not_ours, "-o", tmp_path / "x.png", "--seq", 8)
    assert result.exit_code == 2 and "--seq applies to a preset" in text


def test_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result, text = invoke("plot", "llama-rope", "-o", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "pip install 'pe-export[plot]'" in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
