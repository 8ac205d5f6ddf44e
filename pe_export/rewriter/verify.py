"""Verification of a rewrite, on ONNX Runtime CPU (a whole model is too large for the reference evaluator).

- Per site: the site's cos and sin (B, S, R), exposed as extra outputs of copies of the original and the
  rewritten graph (the replacement keeps the matched values' names), against pe-export's float64
  reference (`pe_export.encodings.rope.tables`) at positions spread over the table, the last ones always
  included; bound: pe-export's fp32 tolerance factor times float32 rounding of one table read.
- Whole model: the original and the rewritten model's outputs at short positions (where the float32
  angles are still exact), inputs generated from the model's own input signature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from pe_export.encodings.rope import RopeParams, inv_freq, tables
from pe_export.rewriter.job import Site
from pe_export.parity import tolerance

EPS32 = 2.0**-24  # float32 unit roundoff
RUNTIMES = ("ort-cpu", "ort-cpu-noopt")
SHORT = 16  # positions 0..SHORT-1 for the whole-model comparison
WHOLE_REL = 1e-4  # relative to the largest output: float32 rounding of cos/sin carried through the layers


@dataclass
class SiteRow:
    site: int
    runtime: str
    positions: list[int]
    original_error: list[float]  # max abs cos/sin error against float64, per position
    rewritten_error: list[float]
    bound: float
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WholeRow:
    runtime: str
    positions: int
    max_abs_diff: float
    bound: float
    verdict: str
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def spread_positions(rows: int, n: int = 12) -> np.ndarray:
    """n positions over [0, rows): 0, evenly spaced ones, and always the last two."""
    pos = np.unique(np.concatenate([np.linspace(0, rows - 1, n - 2).round(), [rows - 2, rows - 1]]).astype(np.int64))
    return pos[pos >= 0]


def session(model_bytes: bytes, runtime: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if runtime == "ort-cpu-noopt":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    if sess.get_providers()[0] != "CPUExecutionProvider":
        raise RuntimeError(f"ran on {sess.get_providers()[0]}, not CPUExecutionProvider")
    return sess


def with_outputs(model: ir.Model, names: list[str]) -> bytes:
    """The model's bytes with the named values as extra outputs (a copy; `model` is unchanged)."""
    proto = ir.to_proto(model)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.add().name = name
    return proto.SerializeToString()


def feeds(model: ir.Model, positions: np.ndarray, batch: int = 1, seed: int = 0) -> dict:
    """Inputs for `model` from its own signature: ids (random in a small range), positions, masks of ones,
    past key/values of length 0."""
    rng = np.random.default_rng(seed)
    S = positions.size
    out = {}
    for v in model.graph.inputs:
        name = v.name.lower()
        dtype = v.dtype.numpy() if v.dtype is not None else np.int64
        dims = [d if isinstance(d, int) else None for d in (v.shape.dims if v.shape is not None else [])]
        if "position" in name:
            out[v.name] = np.repeat(positions[None], batch, 0).astype(dtype)
        elif "mask" in name:
            out[v.name] = np.ones((batch, S), dtype=dtype)
        elif ("past" in name or "cache" in name) and np.issubdtype(dtype, np.floating):
            shape = [batch if i == 0 else (d if d is not None else 0) for i, d in enumerate(dims)]
            out[v.name] = np.zeros(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            out[v.name] = rng.integers(0, 8, (batch, S)).astype(dtype)
        else:
            shape = [batch if i == 0 else (d if d is not None else S) for i, d in enumerate(dims)]
            out[v.name] = rng.standard_normal(shape).astype(dtype)
    return out


def site_reference(site: Site, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (S, R) cos and sin of the site at `positions` (full width [t, t])."""
    p = RopeParams(**site.params)
    cos, sin = tables(p, site.seq_len)  # (P, R/2)
    if site.width == "half":
        return cos[positions], sin[positions]
    full = lambda t: np.concatenate([t[positions], t[positions]], axis=-1)  # noqa: E731
    return full(cos), full(sin)


def check_sites(original: ir.Model, rewritten: ir.Model, sites: list[Site], runtimes=("ort-cpu",)) -> list[SiteRow]:
    rows = []
    names = [n for s in sites if s.width != "table" for n in (s.cos, s.sin)]
    if not names:  # only fused nodes' caches: pe_export.rewriter.verify_caches
        return rows
    orig_bytes, new_bytes = with_outputs(original, names), with_outputs(rewritten, names)
    for runtime in runtimes:
        sess_o, sess_n = session(orig_bytes, runtime), session(new_bytes, runtime)
        for i, site in enumerate(sites):
            if site.width == "table":
                continue
            P = site.params["max_positions"]
            lo, hi = (0, P) if site.seq_len is None else ((0, site.seq_len) if site.seq_len <= site.params["scaling_params"].get("original_max_positions", P) else (site.seq_len - 1, P))
            positions = lo + spread_positions(hi - lo)
            feed = feeds(rewritten, positions)
            ref_cos, ref_sin = site_reference(site, positions)
            errs = {}
            for kind, sess in (("original", sess_o), ("rewritten", sess_n)):
                got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
                c, s = got[site.cos].reshape(-1, positions.size, ref_cos.shape[-1])[0], got[site.sin].reshape(-1, positions.size, ref_sin.shape[-1])[0]
                errs[kind] = np.maximum(np.abs(c - ref_cos).max(-1), np.abs(s - ref_sin).max(-1))
            bound = tolerance("fp32", "decomposed").factor * EPS32 * max(1.0, _factor(site))
            verdict = "pass" if float(errs["rewritten"].max()) <= bound else "FAIL"
            rows.append(SiteRow(i, runtime, positions.tolist(), errs["original"].tolist(), errs["rewritten"].tolist(), bound, verdict))
    return rows


def _factor(site: Site) -> float:
    """The largest |cos| or |sin| of the site: its attention factor (the rule's times the params')."""
    return inv_freq(RopeParams(**site.params), site.seq_len)[1]


def check_whole(original: ir.Model, rewritten: ir.Model, runtimes=("ort-cpu",), batch: int = 2) -> list[WholeRow]:
    positions = np.arange(SHORT, dtype=np.int64)
    orig_bytes, new_bytes = ir.to_proto(original).SerializeToString(), ir.to_proto(rewritten).SerializeToString()
    rows = []
    for runtime in runtimes:
        feed = feeds(rewritten, positions, batch)
        a = session(orig_bytes, runtime).run(None, feed)
        b = session(new_bytes, runtime).run(None, feed)
        diff = max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b))
        scale = max(float(np.abs(x).max()) for x in a)
        bound = WHOLE_REL * max(1.0, scale)
        rows.append(WholeRow(runtime, SHORT, diff, bound, "pass" if diff <= bound else "FAIL"))
    return rows
