"""Parity of an exported graph with the float64 reference, on every runtime that can run it.

One tolerance table, one comparison helper, shared by the tests, the export check, `pe-export verify`
and `pe-export matrix`. Each output element gets its own bound,

    factor * (eps(dtype) * magnitude + denorm_min(dtype)),

where `magnitude` comes from the encoding (for RoPE: `attention_factor * (|a| + |b|)` for the pair
(a, b) the element belongs to, `|x|` on the pass-through tail). It bounds the rounding error of a
correct implementation in that dtype; it is not a number tuned to make a run pass.

Each row reports the error against the float64 truth (is the export faithful, and what does the dtype
cost) and, when the torch original ran, against it in the same dtype (does the file compute what the
PyTorch module computes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pe_export.encodings.attention import encoding_for
from pe_export.encodings.probing import Positions, make_probes, position_grid
from pe_export.errors import one_line
from pe_export.runtimes import DEFAULT_RUNTIMES, RUNTIMES, Skip, Unsupported
from pe_export.spec import Spec
from pe_export.verification.tolerances import bound


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
    Each runtime but torch runs in its own worker process (pe_export.runtimes.worker), one for all its probes: a
    crash is a CRASH row, no answer within `timeout` seconds a TIMEOUT row, and the other rows complete."""
    from pe_export.runtimes import worker

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
                    row.worst_ratio, row.worst_error, row.worst_tolerance = (
                        float(ratio[at]),
                        float(err[at]),
                        float(limit[at]),
                    )
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
