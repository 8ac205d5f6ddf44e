"""--op onnx|ort|decomposed: the second pass, replacing each q/k rotation that reads a rewritten site's
cos/sin by pe-export's lowering (rules of kind "rotation"); a fused node's sites need none (see
`rules.fused_rotary`, `rules.gqa_rotary`)."""

from __future__ import annotations

import onnx_ir as ir

from pe_export.errors import BadInput
from pe_export.rewriter.job import Job
from pe_export.rewriter.rule_set import rule_set

ONNX_OPSET = 23  # the standard RotaryEmbedding


def replace_rotations(model: ir.Model, job: Job) -> int:
    if job.op == "onnx" and model.opset_imports.get("", 1) < ONNX_OPSET:
        from onnxscript import version_converter

        version_converter.convert_version(model, ONNX_OPSET)
    if job.op == "ort":
        from pe_export.custom_ops.lowerings import register_contrib_schema

        register_contrib_schema()
        model.opset_imports.setdefault("com.microsoft", 1)
    count = rule_set(job, kinds=("rotation",)).apply_to_model(model)
    # A fused node's rotation: already the target (counted when its caches were rewritten), or GQA's own, kept.
    if not count and not any(s.fused for s in job.sites):
        why = f" ({job.unlowered[0]})" if job.unlowered else ""
        raise BadInput(
            f"--op {job.op}: no q/k rotation reads the rewritten cos/sin in a shape recognised here (rotate_half)"
            f"{why}; use --op tables"
        )
    return count
