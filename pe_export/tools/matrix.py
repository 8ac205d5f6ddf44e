"""`pe-export matrix`: export and verify every combination of preset, op target and dtype.

    quick   every preset at min(its table length, QUICK_SEQ) positions in fp32 and fp16, with its
            default op target; and llama-rope at its full 8192 positions with every target. This is
            the small set a CI job runs in a few minutes.
    full    every preset at its own table length, with every op target it lowers to and every dtype.

`--shard i/n` keeps every n-th case starting at the i-th (1-based), so n CI jobs split the work.

`compat` folds the rows into the compatibility table: encoding kind x op target x dtype x runtime, each
cell pass (worst error / bound over the presets of that kind), FAIL, cannot load (the runtime rejects
the graph, with its reason), CRASH / TIMEOUT, and, with --probe-bounds, what the runtime does with a
position outside the table when that is not an error (silent, or it aborts the process).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pe_export.dtypes import DTYPES
from pe_export.encodings import ENCODINGS
from pe_export.errors import BadInput, one_line
from pe_export.presets import PRESETS
from pe_export.spec import OP_NAMES, Spec

QUICK_SEQ = 256
QUICK_DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class Case:
    preset: str
    op: str
    dtype: str
    seq: int

    @property
    def name(self) -> str:
        """Names its ONNX file and reproduction bundle: --quick runs one preset, op and dtype at two lengths."""
        return f"{self.preset}-{self.op}-{self.dtype}-{self.seq}"

    def spec(self) -> Spec:
        from pe_export.custom_ops.lowerings import OP_TARGETS

        p = PRESETS[self.preset]
        params = {**p.params, "max_positions": self.seq}
        return Spec(
            encoding=p.encoding, params=params, op=self.op, opset=OP_TARGETS[self.op].min_opset, dtype=self.dtype
        )


def table_length(preset: str) -> int:
    p = PRESETS[preset]
    return ENCODINGS.get(p.encoding).parse(p).max_positions


def _short(preset: str, seq: int) -> int:
    """`seq`, or the preset's own length where its parameters need more (a memory longer than seq)."""
    p = PRESETS[preset]
    try:
        ENCODINGS.get(p.encoding).params(**{**p.params, "max_positions": seq})
        return seq
    except ValueError:
        return table_length(preset)


def cases(presets=None, ops=None, dtypes=None, quick: bool = False) -> list[Case]:
    names = list(PRESETS) if not presets else list(presets)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise BadInput(f"unknown preset {unknown[0]!r}; known: {', '.join(PRESETS)}")
    for what, given, valid in (("--ops", ops, OP_NAMES), ("--dtypes", dtypes, DTYPES)):
        bad = [v for v in given or () if v not in valid]
        if bad:
            raise BadInput(f"{what} takes {', '.join(valid)}; got {bad[0]!r}")
    out = []
    for name in names:
        supported = ENCODINGS.get(PRESETS[name].encoding).ops
        if quick:
            chosen_ops = [o for o in (ops or supported[:1]) if o in supported]
            seq = _short(name, min(table_length(name), QUICK_SEQ))
            out += [Case(name, o, d, seq) for o in chosen_ops for d in (dtypes or QUICK_DTYPES)]
        else:
            chosen_ops = [o for o in (ops or supported) if o in supported]
            out += [Case(name, o, d, table_length(name)) for o in chosen_ops for d in (dtypes or DTYPES)]
    if quick and not presets and not ops:
        seq = table_length("llama-rope")
        out += [Case("llama-rope", o, d, seq) for o in OP_NAMES for d in (dtypes or QUICK_DTYPES)]
    return list(dict.fromkeys(out))  # a name given twice (--dtypes fp32,fp32) is one case


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise BadInput(f"--shard takes i/n with 1 <= i <= n, got {text!r}") from None
    if not 1 <= i <= n:
        raise BadInput(f"--shard takes i/n with 1 <= i <= n, got {text!r}")
    return i, n


def shard(all_cases: list[Case], i: int, n: int) -> list[Case]:
    return all_cases[i - 1 :: n]


def run_case(
    case: Case, folder: Path, runtimes, seed: int = 0, bundles: Path | None = None, bounds: bool = False
) -> dict:
    """Export one case into `folder`, verify it, and on failure write a reproduction bundle.
    `error` is an export or check that did not produce rows; a bundle that cannot be written is
    `bundle_error`, beside the rows that failed (the case's failure is counted once, by its rows)."""
    from pe_export.pipeline.onnx_export import build
    from pe_export.verification.bundles import write_bundle
    from pe_export.verification.out_of_range import probe_bounds
    from pe_export.verification.parity import check, verdict

    result = {
        **asdict(case),
        "rows": [],
        "verdict": "FAIL",
        "seconds": 0.0,
        "error": "",
        "bundle": "",
        "bundle_error": "",
    }
    if bounds:
        result["bounds"] = []
    start = time.perf_counter()
    try:
        spec = case.spec()
        data = build(spec).SerializeToString()
        path = folder / f"{case.name}.onnx"
        path.write_bytes(data)
        rows = check(spec, data, runtimes, seed=seed)
        result["rows"] = [r.as_dict() for r in rows]
        result["verdict"] = verdict(rows)
        if bounds:
            result["bounds"] = [vars(b) for b in probe_bounds(spec, data, runtimes, seed=seed)]
    except Exception as e:  # an export that fails is a failed case, reported with its message
        result["error"] = f"{type(e).__name__}: {one_line(e)}"
    if result["rows"] and result["verdict"] == "FAIL" and bundles is not None:
        try:
            write_bundle(bundles / case.name, spec, data, rows, seed, 2)
            result["bundle"] = str(bundles / case.name)
        except Exception as e:
            result["bundle_error"] = f"{type(e).__name__}: {one_line(e)}"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


VERDICTS = ("pass", "FAIL", "CRASH", "TIMEOUT", "unsupported", "skipped")  # of verify.Row


def summary(results: list[dict]) -> dict:
    rows = [r for c in results for r in c["rows"]]
    # A case that failed before it had rows counts as one FAIL row; one with rows is counted by them.
    broken = sum(1 for c in results if c["error"] and not c["rows"])
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    counts["FAIL"] += broken
    slowest = max(results, key=lambda c: c["seconds"], default=None)
    return {
        "cases": len(results),
        "rows": len(rows) + broken,
        **counts,
        "failed_cases": sum(c["verdict"] == "FAIL" for c in results),
        # No runtime here could run them (ORT CPU has no bf16 kernels; onnx's evaluator no contrib ops).
        "unverified_cases": [
            f"{c['preset']} {c['op']} {c['dtype']} seq {c['seq']}" for c in results if c["verdict"] == "unverified"
        ],
        "slowest": f"{slowest['preset']} {slowest['op']} {slowest['dtype']} seq {slowest['seq']} "
        f"({slowest['seconds']} s)"
        if slowest
        else "",
        "seconds": round(sum(c["seconds"] for c in results), 1),
    }


# ------------------------------------------------------------------------------------------------
# The compatibility table


def kind_of(preset: str) -> str:
    return ENCODINGS.get(PRESETS[preset].encoding).kind


def compat(results: list[dict], runtimes) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the compatibility table: one row per encoding kind x op target x dtype, one
    column per runtime; a cell folds the rows of every preset of that kind (see the module docstring)."""
    cells: dict[tuple, dict[str, list]] = {}
    for c in results:
        key = (kind_of(c["preset"]), c["op"], c["dtype"])
        bounds = {b["runtime"]: b for b in c.get("bounds") or []}
        for name in runtimes:
            row = next((r for r in c["rows"] if r["runtime"] == name), None)
            if row is None and c["error"]:
                row = {"verdict": "FAIL", "note": "export: " + c["error"], "worst_ratio": None}
            if row is not None:
                cells.setdefault(key, {}).setdefault(name, []).append((c["preset"], row, bounds.get(name)))
    order = {k: i for i, k in enumerate(("rotary", "mrotary", "absolute", "bias", "attention"))}
    ops = {o: i for i, o in enumerate(OP_NAMES)}
    header = ["kind", "op", "dtype", "presets", *runtimes]
    rows = []
    for key in sorted(cells, key=lambda k: (order.get(k[0], 9), ops[k[1]], DTYPES.index(k[2]))):
        presets = sorted({p for entries in cells[key].values() for p, _, _ in entries})
        rows.append([*key, str(len(presets)), *(_compat_cell(cells[key].get(n, [])) for n in runtimes)])
    return header, rows


def _short_reason(note: str, limit: int = 90) -> str:
    note = note.removeprefix("cannot load: ")
    return note if len(note) <= limit else note[: limit - 3] + "..."


def _compat_cell(entries) -> str:
    if not entries:
        return ""
    n = len(entries)
    by = {v: [(p, r, b) for p, r, b in entries if r["verdict"] == v] for v in VERDICTS}
    parts = []
    for v in ("CRASH", "TIMEOUT", "FAIL"):
        if by[v]:
            p, r, _ = by[v][0]
            parts.append(f"{v} {len(by[v])}/{n} ({p}: {_short_reason(r['note'])})")
    if by["pass"]:
        worst = max(r["worst_ratio"] for _, r, _ in by["pass"])
        ratio = (
            f"{worst:.2f}" if worst >= 0.01 or worst == 0 else f"{worst:.1e}"
        )  # attention layers sit far under their bound
        parts.append(f"pass {ratio}" + (f" ({len(by['pass'])}/{n})" if len(by["pass"]) < n else ""))
    if by["unsupported"]:
        p, r, _ = by["unsupported"][0]
        k = len(by["unsupported"])
        parts.append(f"cannot load{f' {k}/{n}' if k < n else ''} ({_short_reason(r['note'])})")
    if by["skipped"] and not parts:
        parts.append(f"skipped ({_short_reason(by['skipped'][0][1]['note'])})")
    outcomes = [b["verdict"] for _, _, b in entries if b]
    if "SILENT" in outcomes:
        parts.append("silent out of range")
    if "ABORTS" in outcomes:
        parts.append("aborts out of range")
    return "; ".join(parts)


def compat_markdown(results: list[dict], runtimes, command: str = "") -> str:
    from pe_export.verification.report import _table

    header, rows = compat(results, runtimes)
    s = summary(results)
    lines = ["## Compatibility matrix", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += [
        f"{s['cases']} cases, {s['rows']} rows: {s['pass']} pass, {s['FAIL']} FAIL, {s['CRASH']} CRASH, "
        f"{s['TIMEOUT']} TIMEOUT, "
        f"{s['unsupported']} cannot load, {s['skipped']} skipped.",
        "",
        "Each cell folds every preset of that kind: `pass r` = the worst error / bound over them (< 1 passes); "
        "`FAIL`/`CRASH` k/n = k of the n presets, the first named with its note; `cannot load` = the runtime rejects "
        "the graph (reason); `silent out of range` = it returns a result for position -1 or the table length, "
        "`aborts out of range` = its process dies on one (with --probe-bounds).",
        "",
    ]
    return "\n".join(lines + _table(header, rows)) + "\n"
