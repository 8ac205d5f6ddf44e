"""`pe-export plot`: figures of an encoding (from a preset or a file pe-export wrote) or of a verify report.

Kinds, each drawn on one or more 640 x 480 px panels (figures are a fixed grid of panels at a fixed
dpi, so the PNG's size depends only on the number of panels):

    heatmap      RoPE: the cos and sin tables (position x frequency index), attention factor included;
                 absolute encodings: the embedding table (position x dim); bias encodings: the bias
                 (query x key) of up to four heads. Values come from the encoding's own float64 code:
                 `rope.tables`, and the `reference(spec, inputs)` every encoding registers.
    decay        RoPE's long-term decay (RoFormer, Su et al. 2021, arXiv 2104.09864, section 3.4.3): the
                 relative upper bound (1/(R/2)) sum_{j=1..R/2} |S_j|, S_j = sum_{k<j} e^{i m theta_k},
                 against the relative distance m, for the spec's frequencies and the unscaled ones.
    frequencies  RoPE: `inv_freq` of the spec's scaling rule against the unscaled rule (log scale), both
                 sets of a rule that switches at run time (LongRoPE, dynamic NTK).
    error        a `pe-export verify --report` JSON: max abs error and its bound against position
                 (`by_position` of each row), log scale; infinite errors marked along the top.

matplotlib is an optional extra (`pip install 'pe-export[plot]'`), imported only when drawing, with the
Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pe_export.errors import BadInput
from pe_export.spec import Spec

KINDS = ("heatmap", "decay", "frequencies", "error")
PANEL_INCHES = (6.4, 4.8)
DPI = 100  # one panel: 640 x 480 px
COLUMNS = 2  # panels per row of the figure
TABLE_ROWS = 2048  # positions shown in a table heatmap: more rows than pixels would only alias
BIAS_POSITIONS = 256  # query and key positions shown in a bias heatmap
BIAS_HEADS = 4  # heads shown in a bias heatmap
DECAY_POINTS = 512  # distances, log-spaced over the table, in the decay curve
INSTALL_HINT = "pe-export plot needs matplotlib: pip install 'pe-export[plot]'"
ATTENTION_KEYS = ("attention", "attention_head_dim", "attention_causal")


@dataclass(frozen=True)
class Source:
    """What to plot: an encoding's spec (a preset or an ONNX file), or a verify report."""

    name: str
    spec: Spec | None = None
    report: dict | None = None


# ------------------------------------------------------------------------------------------------
# Sources


def resolve(source: str, seq: int | None = None) -> Source:
    """A preset name (`seq` sets its max_positions), an ONNX file pe-export wrote, or a verify report
    (.json). Raises BadInput with one line for anything else."""
    from pe_export.presets import PRESETS

    if source in PRESETS:
        preset = PRESETS[source]
        params = dict(preset.params) | ({"max_positions": seq} if seq is not None else {})
        spec = Spec(encoding=preset.encoding, params=params)
        validate(spec, f"preset {source}")
        return Source(source, spec=spec)
    path = Path(source)
    if not path.exists():
        raise BadInput(f"{source!r} is neither a preset nor an existing file; presets: {', '.join(PRESETS)}")
    if seq is not None:
        raise BadInput(f"--seq applies to a preset; {source!r} is a file, which brings its own table length")
    if path.suffix.lower() == ".json":
        return Source(source, report=read_report(path))
    from pe_export.pipeline.onnx_export import load

    _, spec = load(path)  # its errors name the file and the problem
    return Source(source, spec=spec)


def validate(spec: Spec, what: str) -> None:
    from pe_export.encodings import ENCODINGS

    try:
        ENCODINGS.get(spec.encoding).params(**plain_params(spec))
    except (TypeError, ValueError) as e:
        raise BadInput(f"{what}: {e}") from None


def read_report(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"{str(path)!r} is not a file")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{str(path)!r} is not valid JSON ({e})") from None
    if isinstance(doc, dict) and "cases" in doc:
        raise BadInput(
            f"{str(path)!r} is a matrix report; pe-export plot takes a verify report (pe-export verify FILE --report "
            f"R.json)"
        )
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise BadInput(
            f"{str(path)!r} is not a verify report (no 'rows' list); write one with pe-export verify FILE --report "
            f"R.json"
        )
    return doc


def plain_params(spec: Spec) -> dict:
    """The encoding's own parameters: an --attention export is plotted as the encoding it wraps."""
    return {k: v for k, v in spec.params.items() if k not in ATTENTION_KEYS}


def kinds_for(src: Source) -> tuple[str, ...]:
    """The kinds that apply to a source, in drawing order."""
    if src.report is not None:
        return ("error",)
    from pe_export.encodings import ENCODINGS

    if src.spec.encoding == "rope":  # the RoPE plots read rope.py's tables and frequencies
        return ("heatmap", "decay", "frequencies")
    return {"absolute": ("heatmap",), "bias": ("heatmap",)}.get(ENCODINGS.get(src.spec.encoding).kind, ())


def choose_kinds(src: Source, kind: str | None) -> tuple[str, ...]:
    """`kind`, or every kind that applies; BadInput when it does not apply to this source."""
    what = "a verify report" if src.report is not None else f"{src.spec.encoding}"
    applies = kinds_for(src)
    if not applies:
        raise BadInput(
            f"pe-export plot has no plot for {what}; it plots rope, the absolute and bias encodings, and verify reports"
        )
    if kind is None:
        return applies
    if kind not in KINDS:
        raise BadInput(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind not in applies:
        raise BadInput(f"--kind {kind} does not apply to {what}; it takes --kind {' or '.join(applies)}")
    return (kind,)


# ------------------------------------------------------------------------------------------------
# The math each plot shows (pure functions, float64)


def decay_curve(angles: np.ndarray) -> np.ndarray:
    """RoFormer's relative upper bound (section 3.4.3): for angles (N, R/2) = m * theta_k at N distances
    m, (1/(R/2)) * sum_{j=1..R/2} |S_j| with S_j = sum_{k<j} e^{i m theta_k}, as (N,). Real pairs, no
    complex numbers: |S_j| = hypot(sum cos, sum sin)."""
    re = np.cumsum(np.cos(angles), axis=-1)  # (N, R/2): real part of S_1 .. S_{R/2}
    im = np.cumsum(np.sin(angles), axis=-1)
    return np.hypot(re, im).mean(axis=-1)


def decay_distances(max_positions: int) -> np.ndarray:
    """0 and up to DECAY_POINTS integer distances log-spaced over [1, max_positions - 1]."""
    if max_positions < 2:
        return np.zeros(1, dtype=np.int64)
    spaced = np.geomspace(1, max_positions - 1, DECAY_POINTS).round().astype(np.int64)
    return np.unique(np.concatenate([[0], spaced]))


def rope_params(spec: Spec):
    from pe_export.encodings.rope import RopeParams

    return RopeParams(**plain_params(spec))


def unscaled(p):
    """The same RoPE with the default rule (no scaling), for comparison."""
    return dataclasses.replace(p, scaling="default", scaling_params={})


def switches(p) -> bool:
    """Whether the rule's frequencies change with the largest position of a call (LongRoPE, dynamic NTK)."""
    from pe_export.encodings.rope import computed_in_graph, switch_at

    return switch_at(p) is not None or computed_in_graph(p)


def frequency_sets(p) -> list[tuple[str, np.ndarray]]:
    """(label, inv_freq (R/2,)) of the spec's rule, one per regime of a rule that switches at run time."""
    from pe_export.encodings.rope import inv_freq

    sets = [(f"{p.scaling}", inv_freq(p)[0])]
    if switches(p):
        sets = [
            (f"{p.scaling}, short calls", inv_freq(p)[0]),
            (f"{p.scaling}, calls reaching position {p.max_positions - 1}", inv_freq(p, p.max_positions)[0]),
        ]
    return sets


def bias_heads(heads: int) -> list[int]:
    return sorted({int(h) for h in np.linspace(0, heads - 1, min(heads, BIAS_HEADS)).round()})


# ------------------------------------------------------------------------------------------------
# Panels: each kind is a list of functions that draw one axes


def panels(src: Source, kind: str) -> list:
    if kind == "error":
        return [lambda fig, ax: draw_error(src.report, fig, ax)]
    from pe_export.encodings import ENCODINGS

    spec = dataclasses.replace(src.spec, params=plain_params(src.spec))
    enc_kind = ENCODINGS.get(spec.encoding).kind
    if kind == "heatmap" and spec.encoding == "rope":
        p = rope_params(spec)
        from pe_export.encodings.rope import tables

        cos, sin = tables(p, p.max_positions)  # (P, R/2) each; the call that reaches the last row
        rows = min(p.max_positions, TABLE_ROWS)
        limit = float(max(np.abs(cos[:rows]).max(), np.abs(sin[:rows]).max()))
        where = f"positions 0..{rows - 1} of {p.max_positions}"
        return [
            lambda fig, ax, t=t, n=n: heatmap(
                fig, ax, t[:rows], f"{src.name}: {n} ({where})", "frequency index m", "position", -limit, limit
            )
            for n, t in (("cos", cos), ("sin", sin))
        ]
    if kind == "heatmap" and enc_kind == "absolute":
        rows = min(ENCODINGS.get(spec.encoding).parse(spec).max_positions, TABLE_ROWS)
        table = ENCODINGS.get(spec.encoding).reference(spec, {"position_ids": np.arange(rows, dtype=np.int64)[None]})[
            0
        ]  # (S, dim)
        return [
            lambda fig, ax: heatmap(
                fig, ax, table, f"{src.name}: embeddings (positions 0..{rows - 1})", "dim", "position"
            )
        ]
    if kind == "heatmap" and enc_kind == "bias":
        n = min(ENCODINGS.get(spec.encoding).parse(spec).max_positions, BIAS_POSITIONS)
        pos = np.arange(n, dtype=np.int64)
        bias = ENCODINGS.get(spec.encoding).reference(spec, {"query_positions": pos, "key_positions": pos})[
            0
        ]  # (H, Q, K)
        return [
            lambda fig, ax, h=h: heatmap(
                fig, ax, bias[h], f"{src.name}: bias, head {h} of {bias.shape[0]}", "key position", "query position"
            )
            for h in bias_heads(bias.shape[0])
        ]
    if kind == "decay":
        return [lambda fig, ax: draw_decay(src.name, rope_params(spec), ax)]
    if kind == "frequencies":
        return [lambda fig, ax: draw_frequencies(src.name, rope_params(spec), ax)]
    raise AssertionError(f"unhandled plot kind {kind!r} for {enc_kind}")


def heatmap(fig, ax, values: np.ndarray, title: str, xlabel: str, ylabel: str, vmin=None, vmax=None):
    data = np.ma.masked_invalid(values)  # a causal bias's -inf entries show as the 'bad' colour
    if vmin is None and data.count():
        vmin, vmax = float(data.min()), float(data.max())
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r" if vmin is not None and vmin < 0 < vmax else "viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax)
    masked = "; grey: -inf (masked)" if np.isneginf(values).any() else ""
    ax.set(title=title + masked, xlabel=xlabel, ylabel=ylabel)
    ax.title.set_fontsize(9)


def draw_decay(name: str, p, ax):
    from pe_export.encodings.rope import angles

    distances = decay_distances(p.max_positions)
    # A rule that switches at run time is shown for the call that reaches the table's last row.
    label = p.scaling + (f", calls reaching position {p.max_positions - 1}" if switches(p) else "")
    curves = [(label, p)] if p.scaling == "default" else [(label, p), ("default (unscaled)", unscaled(p))]
    for label, q in curves:
        ax.plot(distances[1:], decay_curve(angles(q, distances, q.max_positions))[1:], label=label)
    ax.set_xscale("log")
    ax.set(
        title=f"{name}: long-term decay (RoFormer 3.4.3)",
        xlabel="relative distance (positions)",
        ylabel="relative upper bound (1/(R/2)) sum |S_j|",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)


def draw_frequencies(name: str, p, ax):
    from pe_export.encodings.rope import inv_freq

    m = np.arange(p.rotary_dim // 2)
    ax.semilogy(m, inv_freq(unscaled(p))[0], "k--", label="default (unscaled)")
    for label, freqs in frequency_sets(p):
        ax.semilogy(m, freqs, label=label)
    ax.set(
        title=f"{name}: inv_freq, theta {p.theta:g}, R {p.rotary_dim}",
        xlabel="frequency index m",
        ylabel="inv_freq (rad / position)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)


def error_rows(report: dict) -> list[dict]:
    """The report's rows that carry an error-by-position curve."""
    rows = [r for r in report["rows"] if isinstance(r, dict) and (r.get("by_position") or {}).get("positions")]
    if not rows:
        raise BadInput(
            "the report has no by_position data in any row (every runtime skipped, or an older "
            "pe-export wrote it); re-run pe-export verify FILE --report R.json"
        )
    for r in rows:
        by = r["by_position"]
        n = len(by["positions"])
        if not all(isinstance(by.get(k), list) and len(by[k]) == n for k in ("max_abs", "bound")):
            raise BadInput(
                f"row {r.get('runtime', '?')!r} of the report: by_position needs lists positions, max_abs and bound "
                f"of one length"
            )
    return rows


def draw_error(report: dict, fig, ax):
    rows = error_rows(report)
    # Every runtime gets the same bound at a position when it probed the same inputs: draw it once then.
    same_bound = all(
        r["by_position"]["positions"] == rows[0]["by_position"]["positions"]
        and r["by_position"]["bound"] == rows[0]["by_position"]["bound"]
        for r in rows
    )
    if same_bound:
        by = rows[0]["by_position"]
        ax.plot(by["positions"], by["bound"], "k--", linewidth=1, label="bound (every runtime)")
    for i, r in enumerate(rows):
        by, color, name = r["by_position"], f"C{i % 10}", r.get("runtime", "?")
        err = np.asarray(by["max_abs"], dtype=np.float64)
        ax.plot(
            by["positions"],
            np.where(err > 0, err, np.nan),
            color=color,
            linewidth=0.8,
            alpha=0.8,
            label=f"{name} max abs error",
        )
        if not same_bound:
            ax.plot(by["positions"], by["bound"], "--", color=color, linewidth=1, label=f"{name} bound")
        if by.get("infinite"):  # inf or NaN outputs (null in the JSON): marked along the top edge
            ax.plot(
                by["infinite"],
                [0.97] * len(by["infinite"]),
                "v",
                color=color,
                transform=ax.get_xaxis_transform(),
                label=f"{name} infinite error",
            )
    ax.set_yscale("log")
    spec = report.get("spec") or {}
    width = max(r["by_position"].get("bin_width", 1) for r in rows)
    xlabel = "position" + (f" (bins of {width}: max over each)" if width > 1 else "")
    title = (
        f"{report.get('file', '')}: {spec.get('encoding', '')} {spec.get('op', '')} {spec.get('dtype', '')}, "
        f"{report.get('verdict', '')}"
    )
    ax.set(title=title, xlabel=xlabel, ylabel="abs error vs float64 (exact zeros not shown)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


# ------------------------------------------------------------------------------------------------
# Rendering


def figure(src: Source, kinds: tuple[str, ...]):
    """A matplotlib Figure of `kinds` for `src`: panels in a grid of COLUMNS, each PANEL_INCHES at DPI."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if src.report is not None:
        error_rows(src.report)  # refuse a report without curves before drawing anything
    draw = [d for kind in kinds for d in panels(src, kind)]
    cols = min(COLUMNS, len(draw))
    rows = math.ceil(len(draw) / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for d, ax in zip(draw, axes):
        d(fig, ax)
    for ax in axes[len(draw) :]:
        ax.set_axis_off()
    return fig


def render(src: Source, kinds: tuple[str, ...]) -> bytes:
    """The PNG of `figure(src, kinds)`: 640 x 480 px per panel, two panels a row."""
    buf = io.BytesIO()
    # No Software entry (matplotlib's version): the same input gives the same bytes.
    figure(src, kinds).savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput(INSTALL_HINT) from None


def plot(
    source: str, output: Path, kind: str | None = None, seq: int | None = None, force: bool = False
) -> tuple[Source, tuple[str, ...], int]:
    """Resolve, check the output path, draw, write atomically. Returns (source, kinds drawn, bytes)."""
    from pe_export.files import check_output_path, write_atomic

    require_matplotlib()
    if output.suffix.lower() != ".png":
        raise BadInput(f"--output must name a .png file, got {str(output)!r}")
    check_output_path(output, force)
    src = resolve(source, seq)
    kinds = choose_kinds(src, kind)
    data = render(src, kinds)
    write_atomic(data, output, force)
    return src, kinds, len(data)
