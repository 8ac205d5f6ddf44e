"""How an export is packaged and what is written beside it, recorded in `Spec.deploy`: ONNX Runtime's
own `.ort` format, ORT's offline-optimised graph, and external data (tables in `FILE.onnx.data`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from pe_export import files
from pe_export.errors import BadInput, one_line
from pe_export.files import quiet_logging, staged
from pe_export.spec import SPEC_KEY

FORMATS = ("onnx", "ort")
OPTIMIZE_LEVELS = ("basic", "extended", "all")
OPTIMIZE_PROVIDERS = ("cpu", "cuda")
DEPLOY_KEYS = ("external_data", "format", "optimize", "optimize_provider")
# External data switches on by itself above 1 GiB of initializers: half of protobuf's hard 2 GiB limit
# on one serialized file, leaving room for the graph and for runtimes (and tools) that copy the whole
# proto once more while loading it. Below it a single self-contained file is easier to move around.
EXTERNAL_MIN_TENSOR = 1024  # bytes: smaller tensors (shapes, constants) stay inside the .onnx


def check_deploy(spec) -> None:
    """Refuse unknown or inconsistent packaging options (exit 2), before any work."""
    d = spec.deploy
    if not isinstance(d, dict):
        raise BadInput(f"deploy must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(DEPLOY_KEYS))
    if unknown:
        raise BadInput(f"unknown deploy option {unknown[0]!r}; known: {', '.join(DEPLOY_KEYS)}")
    if d.get("format", "onnx") not in FORMATS:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}, got {d['format']!r}")
    if "optimize" in d and d["optimize"] not in OPTIMIZE_LEVELS:
        raise BadInput(f"--optimize must be one of {', '.join(OPTIMIZE_LEVELS)}, got {d['optimize']!r}")
    if d.get("optimize_provider", "cpu") not in OPTIMIZE_PROVIDERS:
        raise BadInput(
            f"--optimize-provider must be one of {', '.join(OPTIMIZE_PROVIDERS)}, got {d['optimize_provider']!r}"
        )
    if "optimize_provider" in d and "optimize" not in d:
        raise BadInput("--optimize-provider needs --optimize LEVEL")
    if spec.params.get("attention") and spec.params.get("tables") == "computed":
        # The attention layer's bound (encodings.common.attention_magnitude) has no float32-angle term yet.
        raise BadInput(
            "--tables computed does not combine with --attention yet: that layer's error bound has no term "
            "for float32 angles; use --tables constant"
        )


def check_tools(spec) -> None:
    """The ORT pieces the packaging options need, before anything is written."""
    import importlib.util

    d = spec.deploy
    if not (d.get("format") == "ort" or "optimize" in d):
        return
    try:
        import onnxruntime as ort
    except ImportError:
        raise BadInput("--format ort and --optimize need onnxruntime (pip install 'pe-export[cpu]')") from None
    if d.get("format") == "ort" and importlib.util.find_spec("onnxruntime.tools.convert_onnx_models_to_ort") is None:
        raise BadInput(
            "--format ort needs ONNX Runtime's conversion tool onnxruntime.tools.convert_onnx_models_to_ort, missing "
            "here"
        )
    if d.get("optimize_provider") == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BadInput(
            f"--optimize-provider cuda needs onnxruntime-gpu and a CUDA device; available: "
            f"{', '.join(ort.get_available_providers())}"
        )


def artifact_paths(spec, output: Path) -> dict:
    """{kind: path} of every file an export writes: the model, its side file, the .ort, the optimised graph."""
    d = spec.deploy
    paths = {"onnx": output}
    if d.get("external_data"):
        paths["data"] = output.with_name(output.name + ".data")
    if d.get("format") == "ort":
        paths["ort"] = output.with_suffix(".ort")
    if "optimize" in d:
        paths["optimized"] = output.with_name(
            f"{output.stem}.opt-{d['optimize']}-{d.get('optimize_provider', 'cpu')}.onnx"
        )
    return paths


def initializer_bytes(model) -> int:
    return sum(len(t.raw_data) or int(np.prod(t.dims, dtype=np.int64)) * 4 for t in model.graph.initializer)


def finalize_spec(spec, model, external: bool | None):
    """Decide external data (None: above files.EXTERNAL_DATA_THRESHOLD) and record it in the model's spec."""
    if external is None:
        external = initializer_bytes(model) > files.EXTERNAL_DATA_THRESHOLD
    deploy = {k: v for k, v in spec.deploy.items() if k != "external_data"} | (
        {"external_data": True} if external else {}
    )
    spec = replace(spec, deploy=deploy)
    for prop in model.metadata_props:
        if prop.key == SPEC_KEY:
            prop.value = spec.to_json()
    return spec


def to_ort_format(model_bytes: bytes) -> bytes:
    """ONNX Runtime's own conversion (onnxruntime.tools.convert_onnx_models_to_ort, fixed optimisations)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(model_bytes)
        try:
            with contextlib.redirect_stdout(io.StringIO()), quiet_logging():
                convert_onnx_models_to_ort(
                    src, output_dir=Path(tmp) / "ort", optimization_styles=[OptimizationStyle.Fixed]
                )
            return (Path(tmp) / "ort" / "model.ort").read_bytes()
        except Exception as e:
            raise BadInput(f"--format ort: ONNX Runtime could not convert the model: {one_line(e, 200)}") from None


def optimize(model_bytes: bytes, level: str, provider: str) -> bytes:
    """ORT's offline-optimised graph for one execution provider (SessionOptions.optimized_model_filepath)."""
    from pe_export.runtimes.ort import ort_session

    name = "CPUExecutionProvider" if provider == "cpu" else "CUDAExecutionProvider"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ort_session(model_bytes, name, optimize=level, optimized_path=Path(tmp) / "optimized.onnx")
            return (Path(tmp) / "optimized.onnx").read_bytes()
        except Exception as e:  # Skip (ORT or the provider absent) included
            raise BadInput(
                f"--optimize: ONNX Runtime could not optimise the model for {provider}: {one_line(e, 200)}"
            ) from None


def write_external(model, path: Path, force: bool) -> list[Path]:
    """The model with its large tensors in `FILE.onnx.data` beside it, written through `files.staged`
    (the side file renamed into place first; neither overwrites without `force`)."""
    import onnx

    side = path.with_name(path.name + ".data")
    with staged([path, side], force) as folder:
        onnx.save_model(
            model,
            folder / path.name,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=side.name,
            size_threshold=EXTERNAL_MIN_TENSOR,
        )
        if not (folder / side.name).exists():  # nothing was big enough: still write the (empty) side file
            (folder / side.name).write_bytes(b"")
    return [path, side]


def load_external_data(model, path: Path) -> None:
    """Read the side file(s) of a model saved with external data, in place; one-line errors."""
    from onnx.external_data_helper import (
        load_external_data_for_model,
        uses_external_data,
    )

    locations = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            locations |= {e.value for e in t.external_data if e.key == "location"}
    if not locations:
        return
    for loc in sorted(locations):
        if Path(loc).name != loc:
            raise BadInput(f"{str(path)!r} names external data {loc!r} outside its folder; refusing to read it")
        if not (path.parent / loc).is_file():
            raise BadInput(f"{str(path)!r} keeps its tables in {loc!r} beside it, which is missing")
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise BadInput(f"{str(path)!r}: cannot read its external data ({one_line(e, 200)})") from None


def describe(spec) -> str:
    """One line for the CLI: what the deploy options of this spec are."""
    parts = [f"static {','.join(map(str, spec.static_shapes))}"] if spec.static_shapes else []
    if spec.params.get("tables") == "computed":
        parts.append("computed tables")
    parts += [f"{k}={v}" for k, v in sorted(spec.deploy.items())]
    return ", ".join(parts)
