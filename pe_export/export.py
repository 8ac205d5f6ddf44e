"""Spec -> ONNX model: torch.onnx.export of the encoding's module, the spec in metadata, onnx's full
checker with shape inference, and an atomic write that never leaves half a file or overwrites silently.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx

from pe_export import __version__
from pe_export.encodings import encoding_for
from pe_export.errors import BadInput
from pe_export.spec import DERIVED_KEY, SPEC_KEY, Spec


def check_spec(spec: Spec) -> None:
    """Refuse, before any work, what the chosen target or opset cannot express, with exit-2 errors."""
    from pe_export.custom_ops.lowerings import OP_TARGETS

    encoding = encoding_for(spec)
    if spec.op not in encoding.ops:
        raise BadInput(f"{encoding.name} exports with --op {' or '.join(encoding.ops)}, got {spec.op!r}")
    opsets = OP_TARGETS[spec.op].opsets()
    if not isinstance(spec.opset, int) or spec.opset not in opsets:
        raise BadInput(f"--op {spec.op} takes an opset in [{opsets.start}, {opsets.stop - 1}], got {spec.opset}")
    if spec.layout not in encoding.layouts:
        raise BadInput(f"{encoding.name} takes --layout {' or '.join(encoding.layouts)}, got {spec.layout!r}")
    try:
        encoding.params(**spec.params)  # validates
    except TypeError as e:  # an unknown or missing parameter name
        raise BadInput(f"bad {spec.encoding} parameters: {e}") from None
    from pe_export import deploy

    deploy.check_deploy(spec)
    if spec.static_shapes:
        deploy.static_sizes(spec)  # fits the contract and the table


def build(spec: Spec) -> onnx.ModelProto:
    import torch

    check_spec(spec)
    enc = encoding_for(spec)
    args, dynamic, input_names, output_names = enc.example_inputs(spec)
    if spec.static_shapes:  # fixed sizes: no symbolic dim in the graph (pe_export.deploy)
        from pe_export.deploy import static_args

        args, dynamic = static_args(spec, args, dynamic, input_names), None
    # The exporter prints progress and warns about internals; neither is the user's concern.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_logging():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            enc.module(spec),
            args,
            dynamo=True,
            opset_version=spec.opset,
            custom_translation_table=enc.translation_table(spec),
            dynamic_shapes=dynamic,
            input_names=input_names,
            output_names=output_names,
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset != spec.opset:  # the exporter's version converter gives up silently on some ops
        raise RuntimeError(f"the exporter wrote opset {opset}, not the {spec.opset} asked for")
    for node in model.graph.node:
        # Stack traces and source paths in node metadata would make the file depend on the install path.
        del node.metadata_props[:]
        node.doc_string = ""
        if opset < 18 and node.op_type.startswith("Reduce"):
            # onnx's 18 -> 17 converter keeps Reduce*'s opset-18 attribute `noop_with_empty_axes`; at 0 (the
            # only value torch emits) it is the opset-17 behaviour, so dropping it changes nothing.
            kept = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(kept)
    del model.metadata_props[:]
    model.producer_name, model.producer_version = "pe-export", __version__
    model.doc_string = f"{spec.encoding} positional encoding exported by pe-export {__version__}"
    derived = json.dumps(enc.derived(spec), sort_keys=True)
    onnx.helper.set_model_props(model, {SPEC_KEY: spec.to_json(), DERIVED_KEY: derived})
    onnx.checker.check_model(model, full_check=True)
    return model


@contextlib.contextmanager
def quiet_logging():
    """The exporter and the version converter log warnings about their internals; errors still show."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def check_output_path(path: Path, force: bool) -> None:
    if not path.parent.is_dir():
        raise BadInput(f"output folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise BadInput(f"output path {str(path)!r} is a folder")
    if path.exists() and not force:
        raise BadInput(f"{str(path)!r} exists; pass --force to overwrite it")


def write_atomic(data: bytes, path: Path, force: bool) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    check_output_path(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        if not force and path.exists():
            raise BadInput(f"{str(path)!r} appeared while exporting; pass --force to overwrite it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_file(path: Path) -> bytes:
    """The bytes of `path`, with one-line errors for a missing path, a folder and an empty file."""
    if not path.exists():
        raise BadInput(f"{str(path)!r} does not exist")
    if not path.is_file():
        raise BadInput(f"{str(path)!r} is not a file")
    data = path.read_bytes()
    if not data:
        raise BadInput(f"{str(path)!r} is empty")
    return data


def not_onnx(path: Path, e: Exception) -> BadInput:
    """The error for a file onnx cannot parse or check (protobuf's and onnx's errors share no base)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BadInput(f"{str(path)!r} is not a valid ONNX model ({first})")


def load(path: Path) -> tuple[onnx.ModelProto, Spec]:
    """Read a file pe-export wrote, with a clear error for anything else."""
    data = read_file(path)
    try:
        model = onnx.load_from_string(data)
        from pe_export.deploy import load_external_data

        load_external_data(model, path)  # the FILE.onnx.data of --external-data, if the model has one
        onnx.checker.check_model(model)
    except BadInput:
        raise
    except Exception as e:
        raise not_onnx(path, e) from None
    props = {p.key: p.value for p in model.metadata_props}
    if SPEC_KEY not in props:
        raise BadInput(f"{str(path)!r} has no {SPEC_KEY} metadata: it was not written by pe-export")
    spec = Spec.from_json(props[SPEC_KEY])
    try:
        check_spec(spec)
    except ValueError as e:
        raise BadInput(f"{str(path)!r} carries an invalid {SPEC_KEY}: {e}") from None
    return model, spec
