"""Verification of a rewrite, on the runtimes `pe-export verify` has (pe_export.runtimes.GRAPH_RUNTIMES:
every one but `torch`, which has no meaning for a foreign model), each in its worker process with a time
limit (pe_export.runtimes.worker): a crash, a hang, or a runtime that cannot load a model is a row with its reason,
and the other rows complete.

- Per site: the site's cos and sin (B, S, R), exposed as extra outputs of copies of the original and the
  rewritten graph (the replacement keeps the matched values' names), against pe-export's float64
  reference (`pe_export.encodings.rope.tables`) at positions spread over the table, the last ones always
  included; bound: pe-export's fp32 tolerance factor times float32 rounding of one table read.
- Per site, with --op onnx|ort|decomposed: each replaced rotation's rotated q or k, exposed the same way,
  against pe-export's float64 rotation (`pe_export.custom_ops.rotation.apply_reference`) of the same run's
  un-rotated q or k (each model's own: later layers' inputs differ by the earlier layers' RoPE), at the
  same positions; bound: the tolerance table's factor * (eps * F * (|a| + |b|) + denorm) per element,
  as `pe-export verify` bounds a RoPE file.
- Whole model: the original and the rewritten model's outputs at short positions (where the float32
  angles are still exact), inputs generated from the model's own input signature.

An M-RoPE position input (3, B, S) is fed three rows that differ (`component_rows`); an M-RoPE site's
rotations are checked against rows selected from the float64 tables as its `sections` say.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pe_export.custom_ops.rotation import apply_reference, heads_axis
from pe_export.dtypes import DENORM_MIN, EPS, numpy_dtype
from pe_export.encodings.rope import RopeParams, inv_freq, pair_sums, tables
from pe_export.errors import one_line
from pe_export.rewriter import DEFAULT_RUNTIMES
from pe_export.rewriter.copies import Copies, is_large
from pe_export.rewriter.copies import as_bytes as with_outputs  # noqa: F401 (the bytes of a copy: tests)
from pe_export.rewriter.core import METADATA_KEY
from pe_export.rewriter.job import Site
from pe_export.runtimes import GRAPH_RUNTIMES
from pe_export.runtimes.outcomes import verdict_of
from pe_export.verification.parity import FAILED
from pe_export.verification.tolerances import tolerance

EPS32 = 2.0**-24  # float32 unit roundoff
SHORT = 16  # positions 0..SHORT-1 for the whole-model comparison
WHOLE_REL = 1e-4  # relative to the largest output: float32 rounding of cos/sin carried through the layers
# A model whose outputs are fp16 or bf16 (onnxruntime-genai's CUDA models) rounds them to its own eps: one
# changed table entry moves them by units of it, so the bound is at least this many of its eps.
WHOLE_NARROW_EPS = 16
NARROW = {np.dtype(np.float16): "fp16", np.dtype(numpy_dtype("bf16")): "bf16"}


@dataclass
class SiteRow:
    site: int
    runtime: str
    positions: list[int]
    original_error: list  # max abs cos/sin error against float64, per position (None: the original did not run)
    rewritten_error: list
    bound: float
    verdict: str  # pass, FAIL, CRASH, TIMEOUT, unsupported (cannot load), skipped (not here)
    provider: str = ""
    note: str = ""
    what: str = "cos/sin"  # or "rotated q/k": every rotation of the site, the error the worst of them

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WholeRow:
    runtime: str
    positions: int
    max_abs_diff: float | None
    bound: float | None
    verdict: str
    note: str = ""
    provider: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def spread_positions(rows: int, n: int = 12) -> np.ndarray:
    """n positions over [0, rows): 0, evenly spaced ones, and always the last two."""
    pos = np.unique(np.concatenate([np.linspace(0, rows - 1, n - 2).round(), [rows - 2, rows - 1]]).astype(np.int64))
    return pos[pos >= 0]


def has_position_input(model: ir.Model) -> bool:
    """Whether the graph takes its positions as an input; if not (optimum's Gemma), it computes them as
    Range(past length, past length + S), so only a contiguous window can be checked, through the past."""
    return any("position" in v.name.lower() for v in model.graph.inputs)


def window(positions: np.ndarray) -> np.ndarray:
    """The contiguous window of as many positions that ends where `positions` end."""
    return positions[-1] - positions.size + 1 + np.arange(positions.size)


def component_rows(positions: np.ndarray) -> np.ndarray:
    """(3, S) M-RoPE positions (temporal, height, width) that differ, each a permutation of `positions`
    (so each reaches its last one): T the positions, H reversed, W rolled by one, as an image's do."""
    return np.stack([positions, positions[::-1], np.roll(positions, 1)])


def feeds(
    model: ir.Model, positions: np.ndarray, batch: int = 1, seed: int = 0, cache_dims: dict | None = None
) -> dict:
    """Inputs for `model` from its own signature: ids (random in a small range), positions, masks of ones,
    past key/values of length 0. A (3, B, S) position input (M-RoPE) gets three rows that differ
    (`component_rows`), so that a section read from the wrong row shows. A past key/value's symbolic
    axes other than the batch take their size from `cache_dims` ({axis: size}, e.g.
    `cache_dims_of(config)`), else 0 (its past length). A graph with no position input reads
    `positions` (a contiguous window, `window`) through a past of length positions[0]."""
    rng = np.random.default_rng(seed)
    S = positions.size
    past = 0 if has_position_input(model) else int(positions[0])
    if past:
        cache_dims = {2: past, **(cache_dims or {})}
    out = {}
    for v in model.graph.inputs:
        name = v.name.lower()
        dtype = v.dtype.numpy() if v.dtype is not None else np.int64
        dims = [d if isinstance(d, int) else None for d in (v.shape.dims if v.shape is not None else [])]
        if "position" in name and len(dims) == 3 and dims[0] in (3, None):  # M-RoPE (3, B, S)
            out[v.name] = np.repeat(component_rows(positions)[:, None], batch, 1).astype(dtype)
        elif "position" in name:
            out[v.name] = np.repeat(positions[None], batch, 0).astype(dtype)
        elif "mask" in name:
            out[v.name] = np.ones((batch, past + S), dtype=dtype)
        elif ("past" in name or "cache" in name) and np.issubdtype(dtype, np.floating):
            given = cache_dims or {}
            shape = [batch if i == 0 else (d if d is not None else given.get(i, 0)) for i, d in enumerate(dims)]
            out[v.name] = np.zeros(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            out[v.name] = rng.integers(0, 8, (batch, S)).astype(dtype)
        else:
            shape = [batch if i == 0 else (d if d is not None else S) for i, d in enumerate(dims)]
            out[v.name] = rng.standard_normal(shape).astype(dtype)
    return out


def cache_dims_of(config) -> dict:
    """{1: key/value heads, 3: head size} of a past key/value (B, H_kv, S_past, D), from a config.json
    path or dict (onnxruntime-genai's builder leaves both axes symbolic); {} when the config lacks them."""
    from pe_export.hf_config import read_config

    cfg = config if isinstance(config, dict) else read_config(Path(config))
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        return {}
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    return {1: int(cfg.get("num_key_value_heads") or heads), 3: int(head_dim)} if head_dim else {}


def run_all(runtime: str, model, names: list[str], inputs: list[dict], timeout: float | None = None):
    """(provider, [{output name: array}] per input dict) from `runtime` in its worker process, `model` its
    bytes or a path (`copies.Copies`); raises the runtime's Skip / Unsupported / Crash / Timeout or its error."""
    from pe_export.runtimes import worker

    call, provider = worker.load(
        runtime, GRAPH_RUNTIMES[runtime], None, model, worker.TIMEOUT_S if timeout is None else timeout
    )
    return provider, [dict(zip(names, call(feed))) for feed in inputs]


def attempt(runtime: str, model, names: list[str], inputs: list[dict], timeout: float | None = None):
    """(provider, outputs, verdict, note): outputs None and the failure's verdict and reason when the
    runtime could not run the model."""
    try:
        provider, got = run_all(runtime, model, names, inputs, timeout)
        return provider, got, "pass", ""
    except Exception as e:  # every failure of a runtime is a row
        return "", None, verdict_of(e), one_line(e)


def run_pair(
    original: ir.Model, rewritten: ir.Model, wanted: list[str], runtimes, inputs: list[dict], timeout=None, only=False
) -> list[tuple]:
    """Both models on each runtime in its worker, the `wanted` values added to their outputs (with `only`,
    the copies pruned to them): per runtime (runtime, provider, (original's outputs, verdict, note),
    (rewritten's outputs, verdict, note)). Large models (`copies.is_large`) go by path, and as one graph
    (`pair.joined`: one load and one run per runtime, the weights and what both compute alike shared)
    wherever one graph holds both; where that graph does not run, each model runs alone, so that the row
    says which of the two the runtime cannot run (a runtime that hangs hangs on both). A worker that held
    their weights is ended after its runtime's runs, so no two runtimes hold them at once (and a worker
    holds one model at a time: it lets the last one go before it loads the next)."""
    from pe_export.runtimes import worker

    worker.start(runtimes, GRAPH_RUNTIMES)  # their interpreters start side by side; an idle one holds no model
    out = []
    with Copies(original, rewritten) as copies:
        pair = copies.joined(original, rewritten, wanted, only) if is_large(original) or is_large(rewritten) else None
        alone = None
        for runtime in runtimes:
            row, given = None, []
            if pair is not None:
                given.append(pair.model)
                provider, got, verdict, note = attempt(runtime, pair.model, pair.outputs, fed(inputs, pair), timeout)
                if verdict in ("pass", "TIMEOUT"):
                    got_o, got_n = _split(got, pair.original, pair.original), _split(got, pair.rewritten, pair.names)
                    row = (runtime, provider, (got_o, verdict, note), (got_n, verdict, note))
            if row is None:
                alone = alone or (
                    copies.with_outputs(original, wanted, only),
                    copies.with_outputs(rewritten, wanted, only),
                )
                orig, new = alone
                given += [orig.model, new.model]
                _, got_o, v_o, note_o = attempt(runtime, orig.model, orig.outputs, fed(inputs, orig), timeout)
                provider, got_n, v_n, note_n = attempt(runtime, new.model, new.outputs, fed(inputs, new), timeout)
                row = (runtime, provider, (got_o, v_o, note_o), (got_n, v_n, note_n))
            if any(copies.holds_weights(m) for m in given):
                worker.drop(runtime, GRAPH_RUNTIMES[runtime])
            out.append(row)
    return out


def _split(got: list[dict] | None, keys: list[str], names: list[str]) -> list[dict] | None:
    """One model's outputs, by their names in that model, from the joined graph's outputs."""
    return None if got is None else [{name: d[key] for key, name in zip(keys, names)} for d in got]


def fed(inputs: list[dict], copy) -> list[dict]:
    """The feeds of the inputs `copy` (a `copies.Copy`) has."""
    return [{k: v for k, v in feed.items() if k in copy.inputs} for feed in inputs]


def site_span(site: Site) -> tuple[int, int]:
    """[lo, hi) of the positions the site serves: its table's; a LongRoPE branch's, its side of the switch
    (the short factors serve positions up to the original length, the long ones from the switch on)."""
    P = site.params["max_positions"]
    if site.seq_len is None:
        return 0, P
    if site.seq_len <= site.params["scaling_params"].get("original_max_positions", P):
        return 0, site.seq_len
    return site.seq_len - 1, P


def site_positions(site: Site) -> np.ndarray:
    """Positions spread over the site's table; a LongRoPE branch: over the positions it serves."""
    lo, hi = site_span(site)
    return lo + spread_positions(hi - lo)


def seq_len(site: Site, positions: np.ndarray) -> int | None:
    """The seq_len the site's frequencies are for: its branch's, or for a dynamic-NTK site (no tables:
    computed in the graph) that of the call, max(position) + 1."""
    return int(positions.max()) + 1 if not site.tables else site.seq_len


def site_reference(site: Site, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (S, R) cos and sin of the site at `positions` (full width [t, t])."""
    p = RopeParams(**site.params)
    cos, sin = tables(p, seq_len(site, positions))  # (P, R/2)
    if site.width == "half":
        return cos[positions], sin[positions]
    if site.width == "repeated":  # [t0, t0, t1, t1, ...] (rules.cos_sin_repeated)
        return np.repeat(cos[positions], 2, axis=-1), np.repeat(sin[positions], 2, axis=-1)
    full = lambda t: np.concatenate([t[positions], t[positions]], axis=-1)  # noqa: E731
    return full(cos), full(sin)


def _cos_sin_error(got: dict, site: Site, positions: np.ndarray, ref_cos, ref_sin) -> np.ndarray:
    """Max abs cos/sin error per position (S,) of one run's outputs."""
    c = got[site.cos].reshape(-1, positions.size, ref_cos.shape[-1])[0]
    s = got[site.sin].reshape(-1, positions.size, ref_sin.shape[-1])[0]
    return np.maximum(np.abs(c - ref_cos).max(-1), np.abs(s - ref_sin).max(-1))


def failure(original: tuple[str, str], rewritten: tuple[str, str]) -> tuple[str, str]:
    """(verdict, note) of a runtime from its (verdict, note) on the original and on the rewritten model.
    An error on both is the runtime's limit, not the rewrite's ("unsupported", as one that cannot load)."""
    (v_o, note_o), (v_n, note_n) = original, rewritten
    if original == rewritten:
        return v_n, note_n  # both ran, or both failed alike (a runtime that is not here)
    if v_n == "FAIL" and v_o != "pass":
        return "unsupported", f"fails on the original too: {note_o}"
    if v_n != "pass":
        return v_n, f"rewritten: {note_n}"
    return ("pass", "") if v_o == "pass" else (v_o, f"original: {note_o}")


def rotation_error(
    got: dict, site: Site, positions: np.ndarray, op: str, rows: np.ndarray | None = None
) -> tuple[np.ndarray, float, float]:
    """(max abs error per position (S,), largest bound, worst error/bound) of every rotated q/k of the
    site in one run, against the float64 rotation of the same run's un-rotated q/k. `rows`: an M-RoPE
    site's (3, S) position rows as fed (`fed_rows`)."""
    p = RopeParams(**site.params)
    cos, sin = tables(p, seq_len(site, positions))  # (P, R/2) float64
    ids = positions
    if site.sections:  # M-RoPE: per-token rows of the three positions, read as a table
        cos, sin = (mrope_token_rows(t, rows, site.sections) for t in (cos, sin))  # (S, R/2)
        ids = np.arange(positions.size)
    factor = tolerance("fp32", op).factor
    err, top, ratio = np.zeros(positions.size), 0.0, 0.0
    for rot in site.rotated:
        x, y = got[rot["x"]], got[rot["y"]]  # (B, H, S, R) or (B, S, H, R)
        pairing = rot["pairing"]
        if pairing == "interleaved_to_half":  # pairs (2i, 2i + 1) written out as halves (rotate_pairs_to_halves)
            x, pairing = np.concatenate([x[..., 0 : p.rotary_dim : 2], x[..., 1 : p.rotary_dim : 2]], -1), "half"
        s_axis = 3 - heads_axis(rot["layout"])  # bhsd: 2, bshd: 1
        batch_ids = np.broadcast_to(ids, (x.shape[0], positions.size))
        ref = apply_reference(x, cos, sin, batch_ids, pairing=pairing, rotary_dim=p.rotary_dim, layout=rot["layout"])
        e = np.abs(y.astype(np.float64) - ref)
        limit = factor * (EPS["fp32"] * _factor(site) * pair_sums(x, pairing, p.rotary_dim) + DENORM_MIN["fp32"])
        other = tuple(a for a in range(e.ndim) if a != s_axis)
        err = np.maximum(err, e[..., : p.rotary_dim].max(axis=other))
        top, ratio = max(top, float(limit.max())), max(ratio, float((e[..., : p.rotary_dim] / limit).max()))
    return err, top, ratio


def _comparable(got: dict, site: Site, positions: np.ndarray, op: str, rows) -> bool:
    """Whether the rotated q/k `got` back from a runtime can be compared with their float64 rotation."""
    try:
        rotation_error(got, site, positions, op, rows)
    except ValueError:
        return False
    return True


def fed_rows(feed: dict, positions: np.ndarray) -> np.ndarray:
    """(3, S) the M-RoPE position rows of batch row 0 in `feed`: a (3, B, S) input's, or three equal rows
    for (B, S) positions (the graph expands them)."""
    three = [v for k, v in feed.items() if "position" in k.lower() and np.ndim(v) == 3]
    return np.asarray(three[0][:, 0]) if three else np.stack([positions] * 3)


def mrope_token_rows(table: np.ndarray, rows: np.ndarray, sections: list[int]) -> np.ndarray:
    """(S, R/2) per-token rows: pair j from `table` (P, R/2) at rows[c], column k, for sections[j] = c * R/2 + k."""
    half = table.shape[-1]
    per_token = table[rows].transpose(1, 0, 2).reshape(rows.shape[1], 3 * half)  # (S, 3R/2)
    return per_token[:, sections]


def check_sites(
    original: ir.Model, rewritten: ir.Model, sites: list[Site], runtimes=DEFAULT_RUNTIMES, timeout: float | None = None
) -> list[SiteRow]:
    """A cos/sin row per site and runtime, and with --op onnx|ort|decomposed a rotated q/k row."""
    op = json.loads(rewritten.metadata_props.get(METADATA_KEY, "{}")).get("op", "decomposed")
    # With --op onnx|ort|decomposed the rotations read the tables: once pruned (as written), the graph
    # computes no full-width cos/sin any more, and the rotated q/k row is the site's check.
    computed = {v.name for node in ir.traversal.RecursiveGraphIterator(rewritten.graph) for v in node.outputs}
    checked = {i: s for i, s in enumerate(sites) if s.width != "table"}  # fused nodes' caches: verify_caches
    if not checked:
        return []
    wanted = [n for s in checked.values() for n in (s.cos, s.sin, *(v for r in s.rotated for v in (r["x"], r["y"])))]
    positions = {i: site_positions(site) for i, site in checked.items()}
    if not has_position_input(rewritten):  # positions from the past length: the window at the end of each range
        positions = {i: window(pos) for i, pos in positions.items()}
    inputs = [feeds(rewritten, pos) for pos in positions.values()]
    refs = {i: site_reference(site, positions[i]) for i, site in checked.items()}
    rows = []
    # The copies are pruned to the values checked: with --op tables, the cos/sin computations alone.
    for runtime, provider, (got_o, v_o, note_o), (got_n, v_n, note_n) in run_pair(
        original, rewritten, wanted, runtimes, inputs, timeout, only=True
    ):
        for j, (i, site) in enumerate(checked.items()):
            bound = tolerance("fp32", "decomposed").factor * EPS32 * max(1.0, _factor(site))
            pos = positions[i]
            verdict, note = failure((v_o, note_o), (v_n, note_n))
            has_cos_sin = site.cos in computed and site.sin in computed
            if got_n is None:
                if has_cos_sin:
                    rows.append(SiteRow(i, runtime, pos.tolist(), [], [], bound, verdict, provider, note))
                if site.rotated:
                    rows.append(SiteRow(i, runtime, pos.tolist(), [], [], 0.0, verdict, provider, note, "rotated q/k"))
                continue
            # The rewritten model ran: its error decides; an original that did not run is only a note.
            if has_cos_sin:
                err_n = _cos_sin_error(got_n[j], site, pos, *refs[i])
                err_o = (
                    _cos_sin_error(got_o[j], site, pos, *refs[i]).tolist() if got_o is not None else [None] * pos.size
                )
                verdict = "pass" if float(err_n.max()) <= bound else "FAIL"
                rows.append(SiteRow(i, runtime, pos.tolist(), err_o, err_n.tolist(), bound, verdict, provider, note))
            if site.rotated:
                rows_fed = fed_rows(inputs[j], pos)
                try:
                    rot_n, top, ratio = rotation_error(got_n[j], site, pos, op, rows_fed)
                    rot_o = (
                        rotation_error(got_o[j], site, pos, op, rows_fed)[0].tolist()
                        if got_o is not None
                        else [None] * pos.size
                    )
                except ValueError as e:  # a value back in another shape (OpenVINO moves a name onto a fused op)
                    both = got_o is not None and not _comparable(got_o[j], site, pos, op, rows_fed)
                    verdict = "unsupported" if both else "FAIL"  # the original's read back fails too: the runtime's
                    note = "; ".join(filter(None, [note, f"rotated q/k not comparable: {one_line(e)}"]))
                    rows.append(SiteRow(i, runtime, pos.tolist(), [], [], 0.0, verdict, provider, note, "rotated q/k"))
                    continue
                worst = f"worst error/bound {ratio:.2f} over {len(site.rotated)} rotations"
                rows.append(
                    SiteRow(
                        i,
                        runtime,
                        pos.tolist(),
                        rot_o,
                        rot_n.tolist(),
                        top,
                        "pass" if ratio <= 1.0 else "FAIL",
                        provider,
                        "; ".join(filter(None, [note, worst])),
                        "rotated q/k",
                    )
                )
    return rows


def _factor(site: Site) -> float:
    """The largest |cos| or |sin| of the site: its attention factor (the rule's times the params')."""
    return inv_freq(RopeParams(**site.params), site.seq_len)[1]  # dynamic NTK: 1 at every length


def check_whole(
    original: ir.Model,
    rewritten: ir.Model,
    runtimes=DEFAULT_RUNTIMES,
    batch: int = 2,
    timeout: float | None = None,
    cache_dims: dict | None = None,
) -> list[WholeRow]:
    """The original and the rewritten model's outputs at positions 0..SHORT-1, a row per runtime."""
    positions = np.arange(SHORT, dtype=np.int64)
    feed = [feeds(rewritten, positions, batch, cache_dims=cache_dims)]
    rows = []
    for runtime, provider, (a, v_o, note_o), (b, v_n, note_n) in run_pair(
        original, rewritten, [], runtimes, feed, timeout
    ):
        names = list(a[0]) if a is not None else []
        verdict, note = failure((v_o, note_o), (v_n, note_n))
        if verdict != "pass":
            rows.append(WholeRow(runtime, SHORT, None, None, verdict, note, provider))
            continue
        a, b = a[0], b[0]
        diff = max(float(np.abs(a[n].astype(np.float64) - b[n]).max()) for n in names)
        scale = max(float(np.abs(a[n]).max()) for n in names)
        narrow = [NARROW[a[n].dtype] for n in names if a[n].dtype in NARROW]
        rel = max([WHOLE_REL, *(WHOLE_NARROW_EPS * EPS[d] for d in narrow)])
        bound = rel * max(1.0, scale)
        rows.append(WholeRow(runtime, SHORT, diff, bound, "pass" if diff <= bound else "FAIL", "", provider))
    return rows


def failed(rows) -> bool:
    """A report fails when a row failed, crashed or hung, or when no runtime checked a site."""
    return any(r.verdict in FAILED for r in rows) or not any(
        r.verdict == "pass" for r in rows if isinstance(r, SiteRow)
    )
