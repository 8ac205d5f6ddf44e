"""Parity of an exported graph with the float64 reference, on every runtime that can run it.

One tolerance table, one comparison helper, shared by the tests, the export check, `pe-export verify`
and `pe-export matrix`. Each output element gets its own bound,

    factor * (eps(dtype) * magnitude + denorm_min(dtype)),

where `magnitude` comes from the encoding (for RoPE: `attention_factor * (|a| + |b|)` for the pair
(a, b) the element belongs to, `|x|` on the pass-through tail). It bounds the rounding error of a
correct implementation in that dtype; it is not a number tuned to make a run pass.

Each row reports the error against the float64 truth (is the export faithful, and what does the dtype
cost) and, when the torch original ran, against it in the same dtype (does the file compute what the
PyTorch module computes).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pe_export.encodings.attention import encoding_for
from pe_export.encodings.common import contract_of
from pe_export.errors import BadInput, one_line
from pe_export.runtimes import DEFAULT_RUNTIMES, RUNTIMES, Skip, Unsupported, to_torch  # noqa: F401 (re-exported)
from pe_export.dtypes import DENORM_MIN, EPS, numpy_dtype  # noqa: F401 (EPS re-exported)
from pe_export.spec import OP_NAMES, Spec



@dataclass(frozen=True)
class Tolerance:
    factor: float
    reason: str


_ROUNDING = (
    "an output a*c - b*s (or b*c + a*s) rounds the tables, the two products and the sum, each by at most "
    "eps/2 relative: at most 1.5 eps * F * (|a| + |b|) to first order, bounded here by 2; results in the "
    "subnormal range add at most half a subnormal spacing per operation. Table reads (absolute, bias) "
    "round once; attention layers bring their own magnitude (encodings.common.attention_magnitude)"
)
_TARGETS = {
    "onnx": "the opset-23 RotaryEmbedding kernel: one product pair and a sum per element",
    "ort": "com.microsoft::RotaryEmbedding: the same arithmetic as the standard op",
    "decomposed": "plain Mul/Add/Sub on gathered tables: the same roundings, in the graph",
}
_DTYPES = {
    "fp32": "",
    "fp16": "; kernels that compute in fp32 inside land well under it",
    "bf16": "; bf16 keeps 8 significant bits, so eps = 2^-7",
}
# (dtype, op target) -> bound. Every entry has the same factor: the arithmetic each target performs
# is the same up to the order of two roundings, so no target is given slack another does not get.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    (dtype, op): Tolerance(2.0, f"{_ROUNDING}{_DTYPES[dtype]}; {op}: {_TARGETS[op]}")
    for dtype in _DTYPES
    for op in OP_NAMES
}


def tolerance(dtype: str, op: str) -> Tolerance:
    return TOLERANCES[(dtype, op)]


@dataclass
class Row:
    runtime: str
    provider: str
    dtype: str
    # "pass", "FAIL", "CRASH" (its process died), "TIMEOUT" (no answer in time), "unsupported" (the
    # runtime rejects the graph: cannot load or convert) or "skipped" (the runtime is not here)
    verdict: str
    max_abs: float | None = None  # against the float64 truth, over all probes and elements
    max_rel: float | None = None  # max abs error / max |reference|, over all probes
    vs_torch_max_abs: float | None = None  # against the torch original in the same dtype
    # The element whose error is largest relative to its own bound: its error, bound and place.
    worst_error: float | None = None
    worst_tolerance: float | None = None
    worst_ratio: float | None = None  # worst_error / worst_tolerance; the row fails above 1
    where: str = ""
    worst_probe: str = ""
    note: str = ""
    probes: list[str] = field(default_factory=list)
    # Max error and bound at each probed position (binned to at most BINS entries), for plots.
    by_position: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The row as plain JSON. JSON has no infinity, and an infinite error (a NaN or inf output) is
        the worst failure there is: it is written as null and named, the fields in `infinite`, the
        bins in `by_position["infinite"]` (their start positions)."""
        d = asdict(self)
        d["infinite"] = [k for k, v in d.items() if isinstance(v, float) and not np.isfinite(v)]
        for k in d["infinite"]:
            d[k] = None
        by = d["by_position"]
        if by:
            by["infinite"] = [p for p, e in zip(by["positions"], by["max_abs"]) if not np.isfinite(e)]
            for k in ("max_abs", "bound"):
                by[k] = [v if np.isfinite(v) else None for v in by[k]]
        return d


BINS = 512


# ------------------------------------------------------------------------------------------------
# Probes


@dataclass(frozen=True)
class Positions:
    """Parsed --positions: half-open ranges (a, b), one position p as (p, p + 1). Expanded only once
    checked against the table, so a slip like 0:10000000000 is refused instead of allocated."""

    ranges: tuple[tuple[int, int], ...]

    def expand(self, P: int) -> np.ndarray:
        for a, b in self.ranges:
            if a < 0 or b > P:
                given = str(a) if b == a + 1 else f"{a}:{b}"
                raise BadInput(f"--positions: {given} is outside the table [0, {P}); "
                               "use --probe-bounds to check out-of-range handling")  # fmt: skip
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges])


def parse_positions(text: str) -> Positions:
    """'0,100,8190:8192' -> positions [0, 100, 8190, 8191]: integers and half-open ranges a:b, in order given."""
    ranges = []
    for item in text.split(","):
        item = item.strip()
        try:
            if ":" in item:
                a, b = (int(v) for v in item.split(":"))
                if b <= a:
                    raise ValueError
                ranges.append((a, b))
            elif item:
                ranges.append((int(item), int(item) + 1))
        except ValueError:
            raise BadInput(f"--positions takes integers and ranges a:b (a < b), comma separated; got {item!r}") from None
    if not ranges:
        raise BadInput("--positions is empty")
    return Positions(tuple(ranges))


def user_probe(spec: Spec, template: dict, positions: Positions | np.ndarray, rng, batch: int) -> dict:
    """The encoding's own probe re-shaped to the given positions (each batch row gets all of them)."""
    enc = encoding_for(spec)
    P = enc.parse(spec).max_positions
    if isinstance(positions, Positions):
        positions = positions.expand(P)
    if positions.min() < 0 or positions.max() >= P:
        bad = positions[(positions < 0) | (positions >= P)][0]
        raise BadInput(f"--positions: {bad} is outside the table [0, {P}); use --probe-bounds to check out-of-range handling")
    dtype = numpy_dtype(spec.dtype)
    noise = lambda shape: rng.standard_normal(shape, dtype=np.float32).astype(dtype)  # noqa: E731
    probe = contract_of(enc).user_probe(spec, template, positions, noise, batch)
    if probe is None:
        raise BadInput(f"--positions does not apply to {enc.name}: its graph takes no position inputs")
    return probe


def make_probes(spec: Spec, seed: int = 0, batch: int = 2, positions: Positions | np.ndarray | None = None):
    """The encoding's probes (spread over the table, its last rows, a decode step, batch > 1) and,
    with `positions`, one more at exactly those positions. Deterministic in (spec, seed, batch)."""
    if batch < 1:
        raise BadInput(f"--batch must be >= 1, got {batch}")
    enc = encoding_for(spec)
    rng = np.random.default_rng(seed)
    probes = enc.probes(spec, np.random.default_rng(seed), batch)
    if positions is not None:
        probes = probes + [("positions", user_probe(spec, probes[0][1], positions, rng, batch))]
    from pe_export.static_shapes import fit_probes  # --static-shapes: every probe re-cut to exactly those sizes

    return fit_probes(spec, probes)


def position_grid(spec: Spec, inputs: dict, shape: tuple) -> np.ndarray | None:
    """The table position of each output element, as an array that broadcasts to `shape`, or None."""
    return contract_of(encoding_for(spec)).position_grid(spec, inputs)


def _by_position(acc: dict, grid, err, limit, P: int):
    """Fold the max error and bound per position bin into `acc` (bins of ceil(P / BINS) positions).
    `grid` broadcasts to the output's shape; the axes it does not vary along are reduced first."""
    if grid is None:
        return
    axes = tuple(i for i, n in enumerate(grid.shape) if n == 1 and err.shape[i] > 1)
    width = -(-P // BINS)
    bins = None
    for key, values in (("max_abs", err), ("bound", limit)):
        reduced = np.max(np.broadcast_to(values, err.shape), axis=axes, keepdims=True)
        if bins is None:
            bins = (np.broadcast_to(grid, reduced.shape) // width).ravel()
        arr = acc.setdefault(key, np.full(-(-P // width), -np.inf))
        np.maximum.at(arr, bins, reduced.ravel())
    acc["width"] = width


def _finish_by_position(acc: dict) -> dict:
    if not acc:
        return {}
    # Every bin a probe reached, an infinite error included (the fill of the others is -inf).
    idx = np.nonzero(acc["max_abs"] > -np.inf)[0]
    return {
        "positions": (idx * acc["width"]).tolist(),
        "bin_width": int(acc["width"]),
        "max_abs": acc["max_abs"][idx].tolist(),
        "bound": acc["bound"][idx].tolist(),
    }


# ------------------------------------------------------------------------------------------------
# The check


def bound(spec: Spec, inputs: dict) -> np.ndarray:
    """The per-element error bound of the output for `inputs`: factor * (eps * magnitude + denorm_min)."""
    magnitude = encoding_for(spec).magnitude(spec, inputs)
    return tolerance(spec.dtype, spec.op).factor * (EPS[spec.dtype] * magnitude + DENORM_MIN[spec.dtype])


def _errors(got: np.ndarray, truth: np.ndarray) -> np.ndarray:
    # Equal infinities (a mask's -inf) are exact; any other NaN or inf error is infinite.
    with np.errstate(invalid="ignore"):
        err = np.where(got == truth, 0.0, np.abs(got - truth))
    return np.where(np.isnan(err), np.inf, err)


FAILED = ("FAIL", "CRASH", "TIMEOUT")  # row verdicts that fail a check (and get a reproduction bundle)


def check(
    spec: Spec,
    model_bytes: bytes,
    runtimes=DEFAULT_RUNTIMES,
    seed: int = 0,
    batch: int = 2,
    positions: Positions | np.ndarray | None = None,
    timeout: float | None = None,
) -> list[Row]:
    """Run every probe on every runtime and compare with the float64 reference (and the torch original).
    Each runtime but torch runs in its own worker process (pe_export.worker), one for all its probes: a
    crash is a CRASH row, no answer within `timeout` seconds a TIMEOUT row, and the other rows complete."""
    from pe_export import worker

    timeout = worker.TIMEOUT_S if timeout is None else timeout
    enc = encoding_for(spec)
    probes = make_probes(spec, seed, batch, positions)
    worker.start(runtimes, RUNTIMES)  # their interpreters start while the reference is computed
    truths = [enc.reference(spec, inputs) for _, inputs in probes]
    bounds = [bound(spec, inputs) for _, inputs in probes]
    P = enc.parse(spec).max_positions
    originals = None  # the torch module's outputs, once it has run
    rows = []
    for name in sorted(runtimes, key=lambda n: n != "torch"):  # torch first: the others compare with it
        row = Row(runtime=name, provider="", dtype=spec.dtype, verdict="pass", probes=[p for p, _ in probes])
        acc: dict = {}
        outputs = []
        try:
            call, row.provider = worker.load(name, RUNTIMES[name], spec, model_bytes, timeout)
            for (probe, inputs), truth, limit in zip(probes, truths, bounds):
                got = call(inputs)
                if got.shape != truth.shape:
                    raise RuntimeError(f"probe {probe}: output shape {got.shape}, want {truth.shape}")
                outputs.append(got)
                err = _errors(got, truth)
                ratio = np.where(np.isfinite(err), err / limit, np.inf)
                at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
                row.max_abs = max(row.max_abs or 0.0, float(np.max(err)))
                finite = np.abs(truth[np.isfinite(truth)])
                row.max_rel = max(row.max_rel or 0.0, float(np.max(err)) / max(float(finite.max(initial=0.0)), 1e-300))
                if row.worst_ratio is None or ratio[at] > row.worst_ratio:
                    row.worst_ratio, row.worst_error, row.worst_tolerance = float(ratio[at]), float(err[at]), float(limit[at])
                    row.where, row.worst_probe = f"{probe}: " + enc.locate(spec, inputs, at), probe
                _by_position(acc, position_grid(spec, inputs, err.shape), err, limit, P)
            if originals is not None and name != "torch":
                row.vs_torch_max_abs = max(float(np.max(_errors(g, o))) for g, o in zip(outputs, originals))
            if name == "torch":
                originals = outputs
            if row.worst_ratio > 1.0:
                row.verdict = "FAIL"
                row.note = f"error {row.worst_error:.3g} over its bound {row.worst_tolerance:.3g} at {row.where}"
        except Skip as e:
            row.verdict, row.note = "skipped", str(e)
        except Unsupported as e:  # the runtime rejects the graph: a limit of the runtime, not of the file
            row.verdict, row.note = "unsupported", str(e)
        except worker.Crash as e:
            row.verdict, row.note = "CRASH", _at_probe(str(e), row.provider, len(outputs), probes)
        except worker.Timeout as e:
            row.verdict, row.note = "TIMEOUT", _at_probe(str(e), row.provider, len(outputs), probes)
        except Exception as e:  # a runtime that errors on a valid input is a failed row, with its message
            row.verdict, row.note = "FAIL", one_line(e)
        row.by_position = _finish_by_position(acc)
        rows.append(row)
    order = {n: i for i, n in enumerate(runtimes)}
    return sorted(rows, key=lambda r: order[r.runtime])


def _at_probe(message: str, loaded: str, done: int, probes) -> str:
    """Where a runtime's process died or hung: loading the model, or the probe it was running."""
    return f"{f'probe {probes[done][0]}' if loaded else 'loading the model'}: {message}"


def verdict(rows: list[Row]) -> str:
    """'pass' when nothing failed and some ONNX runtime passed; 'FAIL' or 'unverified' otherwise."""
    if any(r.verdict in FAILED for r in rows):  # a crash or a hang fails like a wrong answer
        return "FAIL"
    if not any(r.verdict == "pass" and r.runtime != "torch" for r in rows):
        return "unverified"
    return "pass"


# ------------------------------------------------------------------------------------------------
# Out-of-range positions


def bounds_probes(spec: Spec, seed: int = 0) -> list[tuple[str, dict]]:
    """A valid probe with one position moved to -1, and one moved to the table length."""
    enc = encoding_for(spec)
    P = enc.parse(spec).max_positions
    name, template = make_probes(spec, seed, 1)[0]
    keys = [k for k in template if k.endswith("position_ids") or k.endswith("positions")]
    if not keys:
        return []
    cases = []
    for bad in (-1, P):
        inputs = {k: v.copy() for k, v in template.items()}
        inputs[keys[0]].reshape(-1)[-1] = bad
        cases.append((f"{keys[0]} {bad}", inputs))
    return cases


@dataclass
class BoundsRow:
    runtime: str
    # "loud": fails loudly, an error for every bad position; "ABORTS": aborts the process (or hangs) on
    # some, so a caller must guard positions before calling it; "SILENT": returns a result for some (the
    # worst: a wrong answer nobody sees; a runtime both silent and aborting is SILENT); or "skipped"
    verdict: str
    note: str = ""


def probe_bounds(spec: Spec, model_bytes: bytes, runtimes=DEFAULT_RUNTIMES, seed: int = 0, timeout: float | None = None) -> list[BoundsRow]:
    """Feed each runtime positions outside [0, P) and report the ones that return a result anyway, and
    those whose process dies on them (each bad position gets a fresh process after a crash)."""
    from pe_export import worker

    timeout = worker.TIMEOUT_S if timeout is None else timeout
    cases = bounds_probes(spec, seed)
    rows = []
    if cases:
        worker.start(runtimes, RUNTIMES)
    for name in runtimes:
        if not cases:
            rows.append(BoundsRow(name, "skipped", f"{spec.encoding} takes no position inputs"))
            continue
        silent, aborts, call, skipped = [], [], None, None
        for case, inputs in cases:
            try:
                if call is None:
                    call, _ = worker.load(name, RUNTIMES[name], spec, model_bytes, timeout)
            except Skip as e:
                skipped = str(e)
                break
            except (worker.Crash, worker.Timeout, Unsupported, Exception) as e:
                skipped = "cannot load: " + one_line(e, 200).removeprefix("cannot load: ")
                break
            try:
                call(inputs)
                silent.append(case)
            except (worker.Crash, worker.Timeout) as e:
                aborts.append(f"{case} ({one_line(e, 400)})")
                call = None  # its process is gone: the next case loads the model into a new one
            except Exception:  # any error is a loud failure, which is what we want
                pass
        if skipped is not None:
            rows.append(BoundsRow(name, "skipped", skipped))
            continue
        notes = (["returned a result for " + ", ".join(silent)] if silent else []) + (["aborts the process on " + ", ".join(aborts)] if aborts else [])
        rows.append(BoundsRow(name, "SILENT" if silent else "ABORTS" if aborts else "loud", "; ".join(notes)))
    return rows


# ------------------------------------------------------------------------------------------------
# Reproduction bundles


def write_bundle(folder: Path, spec: Spec, model_bytes: bytes, rows: list[Row], seed: int, batch: int,
                 positions_text: str | None = None) -> list[Path]:  # fmt: skip
    """For each failed row: the ONNX file, the failing probe's inputs, the float64 truth and the
    runtime's output as .npz, the spec, and the one command that re-runs the check (README.txt).
    The folder must not exist yet (nothing is overwritten)."""
    from pe_export.onnx_export import write_atomic

    failed = [r for r in rows if r.verdict in FAILED]
    if not failed:
        return []
    folder.mkdir(parents=True)
    enc = encoding_for(spec)
    positions = parse_positions(positions_text) if positions_text else None
    probes = dict(make_probes(spec, seed, batch, positions))
    written = [folder / "model.onnx", folder / "spec.json"]
    write_atomic(model_bytes, written[0], False)
    write_atomic(json.dumps(json.loads(spec.to_json()), indent=2).encode(), written[1], False)
    command = ["pe-export", "verify", "model.onnx", "--runtimes", ",".join(r.runtime for r in failed),
               "--seed", str(seed), "--batch", str(batch)]  # fmt: skip
    if positions_text:
        command += ["--positions", positions_text]
    lines = [f"pe-export reproduction bundle: {spec.encoding}, op {spec.op}, opset {spec.opset}, {spec.dtype}",
             "", "Re-run the check (in this folder):", "", "    " + shlex.join(command), ""]  # fmt: skip
    for r in failed:
        inputs = probes.get(r.worst_probe) or next(iter(probes.values()))
        data = {f"input_{k}": v for k, v in inputs.items()} | {"truth": enc.reference(spec, inputs), "bound": bound(spec, inputs)}
        try:  # in the runtime's worker, like the check: the failure may be a crash
            from pe_export import worker

            data["output"] = worker.load(r.runtime, RUNTIMES[r.runtime], spec, model_bytes)[0](inputs)
        except Exception as e:  # the failure may be that it does not run at all
            lines.append(f"{r.runtime}: running the probe raised: {one_line(e)}")
        path = folder / f"{r.runtime}-{r.worst_probe or 'probe'}.npz"
        with open(path, "wb") as f:
            np.savez(f, **{k: (v.view(np.uint16) if v.dtype == numpy_dtype("bf16") else v) for k, v in data.items()})
        written.append(path)
        lines.append(f"{r.runtime}: {r.note}; inputs, truth (float64), bound and output in {path.name}")
    (folder / "README.txt").write_text("\n".join(lines) + "\n")
    return written + [folder / "README.txt"]
