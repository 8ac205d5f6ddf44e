"""The rewrite report: JSON, or Markdown for a `.md` path (per site and position, the original's and the
rewritten's cos/sin error against float64, and the whole-model comparison)."""

from __future__ import annotations

import json
from pathlib import Path


def document(spec: dict, site_rows, whole_rows) -> dict:
    return {
        "rewrite": spec,
        "sites": [r.to_dict() for r in site_rows],
        "whole_model": [r.to_dict() for r in whole_rows],
    }


def markdown(doc: dict) -> str:
    spec = doc["rewrite"]
    lines = [
        f"# pe-export rewrite (op {spec['op']})",
        "",
        "## Sites",
        "",
        "| site | rule | inv_freq | rotary dim | theta | scaling | table rows | rotations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(spec["sites"]):
        p = s["params"]
        scaling = p["scaling"] + (f" {p['scaling_params']}" if p["scaling_params"] else "")
        lines.append(
            f"| {i} | {s['rule']} | `{s['inv_freq']}` | {p['rotary_dim']} | {p['theta']:g} | {scaling} | "
            f"{p['max_positions']} | {s['rotations']} |"
        )
    for what, title in (
        ("cos/sin", "cos/sin against float64"),
        ("rotated q/k", "rotated q and k against a float64 rotation of the same run's q and k"),
    ):
        rows = [r for r in doc["sites"] if r.get("what", "cos/sin") == what]
        if not rows:
            continue
        lines += [
            "",
            f"## {title}, per site and position",
            "",
            "| site | runtime | position | original error | rewritten error | bound | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if not r["rewritten_error"]:  # the runtime did not run the rewritten model: one row with the reason
                lines.append(f"| {r['site']} | {r['runtime']} | | | | | {r['verdict']}: {r['note']} |")
            for pos, eo, en in zip(r["positions"], r["original_error"], r["rewritten_error"]):
                ok = (
                    r["verdict"]
                    if r["verdict"] != "pass" or what != "cos/sin"
                    else ("pass" if en <= r["bound"] else "FAIL")
                )
                lines.append(
                    f"| {r['site']} | {r['runtime']} | {pos} | {_num(eo)} | {en:.2e} | {r['bound']:.2e} | {ok} |"
                )
    lines += [
        "",
        "## Whole model, original against rewritten at short positions",
        "",
        "| runtime | positions | max abs diff | bound | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in doc["whole_model"]:
        verdict = r["verdict"] + (f": {r['note']}" if r["note"] else "")
        lines.append(
            f"| {r['runtime']} | 0-{r['positions'] - 1} | {_num(r['max_abs_diff'])} | {_num(r['bound'])} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def render(doc: dict, path: Path) -> bytes:
    return (markdown(doc) if path.suffix.lower() == ".md" else json.dumps(doc, indent=2)).encode()
