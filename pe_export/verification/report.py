"""Reports of `pe-export verify` and `pe-export matrix`: one JSON document, rendered as Markdown too.

The report's format is chosen by the file name: `.md` writes Markdown, anything else JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from pe_export.spec import Spec


def verify_doc(path, spec: Spec, rows, result: str, bounds_rows=None, command: str = "") -> dict:
    doc = {
        "file": str(path),
        "spec": json.loads(spec.to_json()),
        "verdict": result,
        "command": command,
        "rows": [r.as_dict() for r in rows],
    }
    if bounds_rows is not None:
        doc["bounds"] = [vars(b) for b in bounds_rows]
    return doc


ROW_COLUMNS = ("runtime", "provider", "max abs err", "vs torch", "worst err / bound", "worst at", "verdict")


def cell(r: dict, key: str, spec: str = ".3g") -> str:
    """A row's number as text: "inf" for the fields the report lists as infinite (JSON holds null)."""
    if key in r.get("infinite", ()):
        return "inf"
    return "" if r[key] is None else format(r[key], spec)


def row_cells(r: dict) -> list[str]:
    worst = ""
    if r["worst_ratio"] is not None or "worst_ratio" in r.get("infinite", ()):
        worst = f"{cell(r, 'worst_error')} / {cell(r, 'worst_tolerance')} ({cell(r, 'worst_ratio', '.2f')})"
    return [
        r["runtime"],
        r["provider"],
        cell(r, "max_abs"),
        cell(r, "vs_torch_max_abs"),
        worst,
        r["where"],
        r["verdict"],
    ]


def _table(header, rows) -> list[str]:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(esc(c) for c in r) + " |" for r in rows
    ]


def verify_markdown(doc: dict) -> str:
    spec = doc["spec"]
    lines = [
        f"# pe-export verify: {doc['file']}",
        "",
        f"{spec['encoding']}, op {spec['op']}, opset {spec['opset']}, {spec['dtype']}, layout {spec['layout']}: "
        f"**{doc['verdict']}**",
        "",
    ]
    if doc.get("command"):
        lines += [f"`{doc['command']}`", ""]
    lines += _table(ROW_COLUMNS, [row_cells(r) for r in doc["rows"]])
    notes = [f"- {r['runtime']} {r['verdict']}: {r['note']}" for r in doc["rows"] if r["note"]]
    if notes:
        lines += [""] + notes
    if "bounds" in doc:
        lines += ["", "Out-of-range positions (-1 and the table length):", ""]
        lines += _table(("runtime", "result", "note"), [(b["runtime"], b["verdict"], b["note"]) for b in doc["bounds"]])
    lines += [
        "",
        "Errors are against the float64 reference; 'vs torch' against the PyTorch original in the same dtype.",
    ]
    return "\n".join(lines) + "\n"


MATRIX_COLUMNS = (
    "preset",
    "op",
    "dtype",
    "seq",
    "runtime",
    "provider",
    "max abs err",
    "vs torch",
    "worst / bound",
    "verdict",
    "note",
)


def matrix_markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = [
        "# pe-export matrix",
        "",
        f"{s['cases']} exports, {s['rows']} rows: {s['pass']} pass, {s['FAIL']} FAIL, {s['skipped']} skipped"
        f" ({doc['mode']}{', shard ' + doc['shard'] if doc.get('shard') else ''}).",
        f"Slowest case: {s['slowest']}.",
        "",
    ]
    if s.get("unverified_cases"):
        lines += [f"Unverified (no runtime here can run them): {', '.join(s['unverified_cases'])}.", ""]
    rows = []
    for case in doc["cases"]:
        for r in case["rows"]:
            note = r["note"][:120] if r["verdict"] != "pass" else ""
            rows.append(
                (
                    case["preset"],
                    case["op"],
                    case["dtype"],
                    case["seq"],
                    r["runtime"],
                    r["provider"],
                    cell(r, "max_abs"),
                    cell(r, "vs_torch_max_abs"),
                    cell(r, "worst_ratio", ".2f"),
                    r["verdict"],
                    note,
                )
            )
        if case.get("error"):
            rows.append(
                (
                    case["preset"],
                    case["op"],
                    case["dtype"],
                    case["seq"],
                    "export",
                    "",
                    "",
                    "",
                    "",
                    "FAIL",
                    case["error"][:120],
                )
            )
    lines += _table(MATRIX_COLUMNS, rows)
    bundles = [f"- {c['preset']} {c['op']} {c['dtype']}: {c['bundle']}" for c in doc["cases"] if c.get("bundle")]
    if bundles:
        lines += ["", "Reproduction bundles:", ""] + bundles
    return "\n".join(lines) + "\n"


def render(doc: dict, path: Path) -> bytes:
    if path.suffix.lower() == ".md":
        return (matrix_markdown(doc) if "cases" in doc else verify_markdown(doc)).encode()
    return json.dumps(doc, indent=2).encode()
