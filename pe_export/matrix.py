"""`pe-export matrix`: export and verify every combination of preset, op target and dtype.

    quick   every preset at min(its table length, QUICK_SEQ) positions in fp32 and fp16, with its
            default op target; and llama-rope at its full 8192 positions with every target. This is
            the small set a CI job runs in a few minutes.
    full    every preset at its own table length, with every op target it lowers to and every dtype.

`--shard i/n` keeps every n-th case starting at the i-th (1-based), so n CI jobs split the work.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pe_export.encodings import ENCODINGS
from pe_export.errors import BadInput, one_line
from pe_export.presets import PRESETS
from pe_export.dtypes import DTYPES
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
        return Spec(encoding=p.encoding, params=params, op=self.op, opset=OP_TARGETS[self.op].min_opset, dtype=self.dtype)


def table_length(preset: str) -> int:
    p = PRESETS[preset]
    return ENCODINGS.get(p.encoding).params(**p.params).max_positions


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


def run_case(case: Case, folder: Path, runtimes, seed: int = 0, bundles: Path | None = None) -> dict:
    """Export one case into `folder`, verify it, and on failure write a reproduction bundle.
    `error` is an export or check that did not produce rows; a bundle that cannot be written is
    `bundle_error`, beside the rows that failed (the case's failure is counted once, by its rows)."""
    from pe_export.onnx_export import build
    from pe_export.parity import check, verdict, write_bundle

    result = {**asdict(case), "rows": [], "verdict": "FAIL", "seconds": 0.0, "error": "", "bundle": "", "bundle_error": ""}
    start = time.perf_counter()
    try:
        spec = case.spec()
        data = build(spec).SerializeToString()
        path = folder / f"{case.name}.onnx"
        path.write_bytes(data)
        rows = check(spec, data, runtimes, seed=seed)
        result["rows"] = [r.as_dict() for r in rows]
        result["verdict"] = verdict(rows)
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


def summary(results: list[dict]) -> dict:
    rows = [r for c in results for r in c["rows"]]
    # A case that failed before it had rows counts as one FAIL row; one with rows is counted by them.
    broken = sum(1 for c in results if c["error"] and not c["rows"])
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("pass", "FAIL", "skipped")}
    counts["FAIL"] += broken
    slowest = max(results, key=lambda c: c["seconds"], default=None)
    return {
        "cases": len(results),
        "rows": len(rows) + broken,
        **counts,
        "failed_cases": sum(c["verdict"] == "FAIL" for c in results),
        # No runtime here could run them (ORT CPU has no bf16 kernels; onnx's evaluator no contrib ops).
        "unverified_cases": [f"{c['preset']} {c['op']} {c['dtype']} seq {c['seq']}" for c in results if c["verdict"] == "unverified"],
        "slowest": f"{slowest['preset']} {slowest['op']} {slowest['dtype']} seq {slowest['seq']} ({slowest['seconds']} s)" if slowest else "",
        "seconds": round(sum(c["seconds"] for c in results), 1),
    }
