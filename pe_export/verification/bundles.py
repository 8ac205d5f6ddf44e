"""Reproduction bundles: for each failed row, the file, the probe, the truth and the output, and the
one command that re-runs the check."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from pe_export.dtypes import numpy_dtype
from pe_export.encodings.attention import encoding_for
from pe_export.encodings.probing import make_probes, parse_positions
from pe_export.errors import one_line
from pe_export.runtimes import RUNTIMES
from pe_export.spec import Spec
from pe_export.verification.parity import FAILED, Row
from pe_export.verification.tolerances import bound

# Reproduction bundles


def write_bundle(
    folder: Path,
    spec: Spec,
    model_bytes: bytes,
    rows: list[Row],
    seed: int,
    batch: int,
    positions_text: str | None = None,
) -> list[Path]:
    """For each failed row: the ONNX file, the failing probe's inputs, the float64 truth and the
    runtime's output as .npz, the spec, and the one command that re-runs the check (README.txt).
    The folder must not exist yet (nothing is overwritten)."""
    from pe_export.files import write_atomic

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
    command = [
        "pe-export",
        "verify",
        "model.onnx",
        "--runtimes",
        ",".join(r.runtime for r in failed),
        "--seed",
        str(seed),
        "--batch",
        str(batch),
    ]
    if positions_text:
        command += ["--positions", positions_text]
    lines = [
        f"pe-export reproduction bundle: {spec.encoding}, op {spec.op}, opset {spec.opset}, {spec.dtype}",
        "",
        "Re-run the check (in this folder):",
        "",
        "    " + shlex.join(command),
        "",
    ]
    for r in failed:
        inputs = probes.get(r.worst_probe) or next(iter(probes.values()))
        data = {f"input_{k}": v for k, v in inputs.items()} | {
            "truth": enc.reference(spec, inputs),
            "bound": bound(spec, inputs),
        }
        try:  # in the runtime's worker, like the check: the failure may be a crash
            from pe_export.runtimes import worker

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
