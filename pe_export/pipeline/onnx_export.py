"""Spec -> ONNX model: torch.onnx.export of the encoding's module, the spec in metadata, onnx's full
checker with shape inference, and an atomic write that never leaves half a file or overwrites silently.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import onnx

from pe_export.encodings.attention import encoding_for
from pe_export.encodings.static_shapes import static_args, static_sizes
from pe_export.errors import BadInput
from pe_export.files import not_onnx, quiet_logging, read_file
from pe_export.pipeline import packaging
from pe_export.spec import DERIVED_KEY, SPEC_KEY, VERSION, Spec


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
        encoding.parse(spec)  # validates
    except TypeError as e:  # an unknown or missing parameter name
        raise BadInput(f"bad {spec.encoding} parameters: {e}") from None
    packaging.check_deploy(spec)
    if spec.static_shapes:
        static_sizes(spec)  # fits the contract and the table


def build(spec: Spec) -> onnx.ModelProto:
    import torch

    check_spec(spec)
    enc = encoding_for(spec)
    args, dynamic, input_names, output_names = enc.example_inputs(spec)
    if spec.static_shapes:  # fixed sizes: no symbolic dim in the graph (pe_export.encodings.static_shapes)
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
    model.producer_name, model.producer_version = "pe-export", VERSION
    model.doc_string = f"{spec.encoding} positional encoding exported by pe-export {VERSION}"
    derived = json.dumps(enc.derived(spec), sort_keys=True)
    onnx.helper.set_model_props(model, {SPEC_KEY: spec.to_json(), DERIVED_KEY: derived})
    onnx.checker.check_model(model, full_check=True)
    return model


def load(path: Path) -> tuple[onnx.ModelProto, Spec]:
    """Read a file pe-export wrote, with a clear error for anything else."""
    data = read_file(path)
    try:
        model = onnx.load_from_string(data)
        packaging.load_external_data(model, path)  # the FILE.onnx.data of --external-data, if the model has one
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
