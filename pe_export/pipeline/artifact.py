"""The export pipeline the CLI runs, as library calls that return results instead of printing.

    job = prepare(spec_or_preset, path, **options)   # every check; nothing written yet (BadInput)
    written = write(job)                              # build, package, write atomically
    result = verify(path)                             # parity on every runtime; report, bundle
    export(spec_or_preset, path, **options)           # the three, -> ExportResult

`spec_or_preset` is a `Spec`, a preset name, or a parameter dataclass (`pe_export.preset(...)`,
`RopeParams(...)`). Every bad input raises `BadInput` with the one-line message the CLI prints.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.custom_ops.op_choice import pick_op
from pe_export.encodings import ENCODINGS
from pe_export.encodings.probing import make_probes, parse_positions
from pe_export.encodings.rope import switch_note
from pe_export.errors import BadInput
from pe_export.files import check_output_path, write_atomic
from pe_export.pipeline import onnx_export, packaging
from pe_export.presets import PRESETS, Preset
from pe_export.runtimes import DEFAULT_RUNTIMES, RUNTIMES, check_names
from pe_export.spec import Spec
from pe_export.verification import bundles, out_of_range, parity
from pe_export.verification.report import render, verify_doc
from pe_export.weights import WEIGHT_FIELDS

# What can load the files written beside the model: an .ort file only ONNX Runtime; an optimised graph
# also onnx's evaluator where ORT kept to standard ops (it skips itself when a node is com.microsoft).
ORT_FORMAT_RUNTIMES = ("torch", "ort-cpu", "ort-cpu-noopt", "ort-cuda")
OPTIMIZED_RUNTIMES = {"cpu": ("torch", "ort-cpu", "ort-cpu-noopt", "onnx-reference"), "cuda": ("torch", "ort-cuda")}


@dataclass(frozen=True)
class ExportJob:
    """An export that passed every check: what will be built and where it goes."""

    spec: Spec
    output: Path
    force: bool = False
    external_data: bool | None = None  # None: on above files.EXTERNAL_DATA_THRESHOLD
    notes: tuple[
        str, ...
    ] = ()  # what the user should know before the work (the --op auto choice, a switch never reached)


@dataclass(frozen=True)
class Written:
    spec: Spec  # as recorded in the file (external data decided)
    paths: dict  # {kind: Path}: "onnx", and "data", "ort", "optimized" where written
    size: int  # bytes of the model and its external data


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    spec: Spec
    rows: list  # pe_export.verification.parity.Row, one per runtime
    verdict: str  # "pass", "FAIL" or "unverified" (pe_export.verification.parity.verdict)
    bounds: list | None = None  # pe_export.verification.out_of_range.BoundsRow with probe_bounds
    report: Path | None = None
    bundle: Path | None = None  # the reproduction bundle written on FAIL
    bundle_error: str | None = None

    @property
    def silent(self) -> list[str]:
        """Runtimes that returned results for positions outside the table."""
        return [b.runtime for b in self.bounds or [] if b.verdict == "SILENT"]

    @property
    def aborts(self) -> list[str]:
        """Runtimes whose process died or hung on positions outside the table."""
        return [b.runtime for b in self.bounds or [] if b.verdict == "ABORTS"]


@dataclass(frozen=True)
class ExportResult:
    job: ExportJob
    written: Written
    verification: VerifyResult | None  # None with verify=False
    artifacts: dict = field(default_factory=dict)  # {kind: VerifyResult} of the .ort / optimised files

    @property
    def path(self) -> Path:
        return self.written.paths["onnx"]

    @property
    def verdict(self) -> str:
        results = [self.verification, *self.artifacts.values()]
        verdicts = [r.verdict for r in results if r is not None]
        return "FAIL" if "FAIL" in verdicts else "unverified" if "unverified" in verdicts or not verdicts else "pass"


def encoding_of(params) -> str:
    """The registered encoding whose parameter dataclass `params` is an instance of."""
    for name in ENCODINGS.names():
        if type(params) is ENCODINGS.get(name).params:
            return name
    raise BadInput(
        f"{type(params).__name__} is not the parameters of an encoding; encodings: {', '.join(ENCODINGS.names())}"
    )


def as_spec(
    spec_or_preset,
    *,
    op=None,
    dtype="fp32",
    layout="bhsd",
    opset=None,
    seq=None,
    static_shapes=None,
    format=None,
    optimize=None,
    optimize_provider=None,
    external_data=None,
) -> tuple[Spec, str | None]:
    """The spec of an export and, for `op="auto"`, why that target was picked."""
    if isinstance(spec_or_preset, Spec):
        return spec_or_preset, None
    if isinstance(spec_or_preset, str):
        if spec_or_preset not in PRESETS:
            raise BadInput(f"unknown preset {spec_or_preset!r}; presets: {', '.join(PRESETS)}")
        spec_or_preset = PRESETS[spec_or_preset]
    if isinstance(spec_or_preset, Preset):
        encoding, params = spec_or_preset.encoding, dict(spec_or_preset.params)
    elif dataclasses.is_dataclass(spec_or_preset) and not isinstance(spec_or_preset, type):
        encoding, params = encoding_of(spec_or_preset), dataclasses.asdict(spec_or_preset)
    else:
        raise BadInput(
            f"export takes a Spec, a preset name or encoding parameters, got {type(spec_or_preset).__name__}"
        )
    if seq is not None:
        params["max_positions"] = seq
    settings = {"format": format, "optimize": optimize, "optimize_provider": optimize_provider}
    settings = {k: v for k, v in settings.items() if v is not None and v != "onnx"}
    if external_data:
        settings["external_data"] = True
    ops, picked = ENCODINGS.get(encoding).ops, None
    op = op or ops[0]
    if op == "auto":
        op, picked = pick_op(ops, opset, settings.get("format") == "ort" or "optimize" in settings)
    if op not in OP_TARGETS:
        raise BadInput(f"op must be one of {', '.join(OP_TARGETS)} or auto, got {op!r}")
    opset = opset if opset is not None else OP_TARGETS[op].min_opset
    try:
        spec = Spec(
            encoding=encoding,
            params=params,
            op=op,
            opset=opset,
            dtype=dtype,
            layout=layout,
            static_shapes=static_shapes,
            deploy=settings,
        )
    except ValueError as e:
        raise BadInput(str(e)) from None
    return spec, picked and f"--op auto picked {op} (opset {opset}): {picked}"


def prepare(spec_or_preset, path=None, *, force: bool = False, report=None, **options) -> ExportJob:
    """Check everything an export needs before any work: parameters, target, opset, packaging tools,
    and that no output (model, side files, report) exists unless `force`."""
    external = options.get("external_data")
    spec, picked = as_spec(spec_or_preset, **options)
    name = spec_or_preset if isinstance(spec_or_preset, str) else getattr(spec_or_preset, "name", spec.encoding)
    output = Path(path) if path is not None else Path(f"{name}.onnx")
    try:
        onnx_export.check_spec(spec)
        packaging.check_tools(spec)
        for p in packaging.artifact_paths(spec, output).values():
            check_output_path(p, force)
        check_report_path(report, output, force)
    except ValueError as e:  # parameter validation and BadInput alike
        raise BadInput(str(e)) from None
    notes = [picked] if picked else []
    if spec.encoding == "rope" and (note := switch_note(ENCODINGS.get("rope").parse(spec))):
        notes.append(note)
    return ExportJob(spec=spec, output=output, force=force, external_data=external, notes=tuple(notes))


def write(job: ExportJob) -> Written:
    """Build the graph, package it, and write every file atomically (never over one without force)."""
    output, force = job.output, job.force
    try:
        model = onnx_export.build(job.spec)
        spec = packaging.finalize_spec(job.spec, model, job.external_data)  # records external data
        data = model.SerializeToString()
        extra = {}  # kind -> bytes of the files written beside the model
        if spec.deploy.get("format") == "ort":
            extra["ort"] = packaging.to_ort_format(data)
        if "optimize" in spec.deploy:
            extra["optimized"] = packaging.optimize(
                data, spec.deploy["optimize"], spec.deploy.get("optimize_provider", "cpu")
            )
        paths = packaging.artifact_paths(spec, output)
        for p in paths.values():  # again: a file may have appeared while building
            check_output_path(p, force)
        if spec.deploy.get("external_data"):
            packaging.write_external(model, output, force)
        else:
            write_atomic(data, output, force)
        for kind, blob in extra.items():
            write_atomic(blob, paths[kind], force)
    except ValueError as e:  # weights that changed or went missing since they were checked; ORT refusing
        raise BadInput(str(e)) from None
    size = sum(paths[k].stat().st_size for k in ("onnx", "data") if k in paths)
    return Written(spec=spec, paths=paths, size=size)


def check_report_path(report, model_path, force) -> None:
    if report is None:
        return
    if Path(report).resolve() == Path(model_path).resolve():
        raise BadInput(f"--report {str(report)!r} is the model file itself; name another file")
    check_output_path(Path(report), force)


def check_runtimes(runtimes) -> tuple[str, ...]:
    return DEFAULT_RUNTIMES if runtimes is None else check_names(runtimes)


def start_runtimes(runtimes=None) -> None:
    """Start the verifying runtimes' worker processes now: each imports its runtime while the export runs."""
    from pe_export.runtimes import worker

    worker.start(check_runtimes(runtimes), RUNTIMES)


def weights_source(path, key: str) -> dict:
    """The parameters that name a learned table read from a file: {weights, key, weights_sha256},
    the tensor read once now (BadInput for a missing file, key or dtype)."""
    from pe_export import weights

    src = weights.LearnedWeights(weights=str(Path(path).resolve()), key=key)
    return {"weights": src.weights, "key": src.key, "weights_sha256": weights.digest(weights.load(src))}


def free_folder(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ...: the first that does not exist (a bundle never overwrites)."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def verify(
    path,
    runtimes=None,
    positions: str | None = None,
    *,
    batch: int = 2,
    seed: int = 0,
    probe_bounds: bool = False,
    report=None,
    bundle=None,
    force: bool = False,
    weights=None,
) -> VerifyResult:
    """Re-verify a file pe-export wrote against the float64 reference rebuilt from its embedded spec:
    positions over the whole table (its last rows always), a decode step and batch > 1, on every
    runtime in `runtimes` (default: all; absent ones are skipped rows). `positions` adds exactly
    those positions ("0,131000:131072"). On FAIL a reproduction bundle is written (`bundle`, default
    FILE.repro); `report` (.json or .md) gets the report."""
    path = Path(path)
    runtimes = check_runtimes(runtimes)
    if not isinstance(batch, int) or not 1 <= batch <= 64:
        raise BadInput(f"batch must be in [1, 64], got {batch}")
    try:
        wanted = parse_positions(positions) if positions is not None else None
        model, spec = onnx_export.load(path)
        if weights is not None:
            if "weights_sha256" not in spec.params:
                raise BadInput(f"{path} was exported with random weights (weights_seed); --weights does not apply")
            spec = dataclasses.replace(spec, params={**spec.params, "weights": str(Path(weights).resolve())})
        if "weights_sha256" in spec.params:  # the learned tensor must still be there, unchanged
            from pe_export import weights as learned

            learned.load(learned.LearnedWeights(**{k: spec.params.get(k) for k in WEIGHT_FIELDS}))
        if wanted is not None:
            make_probes(spec, seed, batch, wanted)  # refuses positions outside the table, before any work
        check_report_path(report, path, force)
    except ValueError as e:
        raise BadInput(str(e)) from None
    data = model.SerializeToString()
    rows = parity.check(spec, data, runtimes, seed=seed, batch=batch, positions=wanted)
    bounds = out_of_range.probe_bounds(spec, data, runtimes, seed=seed) if probe_bounds else None
    result = parity.verdict(rows)
    command = [
        "pe-export",
        "verify",
        str(path),
        "--runtimes",
        ",".join(runtimes),
        "--seed",
        str(seed),
        "--batch",
        str(batch),
    ]
    command += ["--positions", positions] if positions else []
    command += ["--probe-bounds"] if probe_bounds else []
    if report is not None:
        doc = verify_doc(path, spec, rows, result, bounds, shlex.join(command))
        write_atomic(render(doc, Path(report)), Path(report), force)
    folder = error = None
    if result == "FAIL":
        folder = free_folder(Path(bundle) if bundle is not None else Path(f"{path}.repro"))
        try:
            bundles.write_bundle(folder, spec, data, rows, seed, batch, positions)
        except OSError as e:
            folder, error = None, f"could not write the reproduction bundle: {e}"
    return VerifyResult(
        path=path,
        spec=spec,
        rows=rows,
        verdict=result,
        bounds=bounds,
        report=Path(report) if report is not None else None,
        bundle=folder,
        bundle_error=error,
    )


def verify_artifact(path: Path, spec: Spec, runtimes=None, seed: int = 0) -> VerifyResult:
    """Verify a file written beside the model (.ort, optimised graph) with the model's spec."""
    rows = parity.check(spec, Path(path).read_bytes(), check_runtimes(runtimes), seed=seed)
    return VerifyResult(path=Path(path), spec=spec, rows=rows, verdict=parity.verdict(rows))


def artifact_runtimes(spec: Spec, kind: str) -> tuple[str, ...]:
    """The runtimes that can load a file written beside the model ("ort" or "optimized")."""
    return ORT_FORMAT_RUNTIMES if kind == "ort" else OPTIMIZED_RUNTIMES[spec.deploy.get("optimize_provider", "cpu")]


def export(
    spec_or_preset,
    path=None,
    *,
    runtimes=None,
    report=None,
    force: bool = False,
    seed: int = 0,
    verify_file: bool = True,
    **options,
) -> ExportResult:
    """Export, write and verify: the whole `pe-export PRESET` job. Options: op ("onnx", "ort",
    "decomposed", "auto"), dtype, layout, opset, seq, static_shapes ([B, S(, H)]), format ("ort"),
    optimize ("basic", "extended", "all"), optimize_provider, external_data."""
    runtimes = check_runtimes(runtimes)
    job = prepare(spec_or_preset, path, force=force, report=report, **options)
    start_runtimes(runtimes)
    written = write(job)
    if not verify_file:
        return ExportResult(job=job, written=written, verification=None)
    result = verify(written.paths["onnx"], runtimes, report=report, force=force, seed=seed)
    artifacts = {
        kind: verify_artifact(written.paths[kind], written.spec, artifact_runtimes(written.spec, kind), seed)
        for kind in ("ort", "optimized")
        if kind in written.paths
    }
    return ExportResult(job=job, written=written, verification=result, artifacts=artifacts)
