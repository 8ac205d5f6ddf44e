"""`--op auto`: the best ONNX target for the opset and the runtime the file is for."""

from __future__ import annotations

from pe_export.custom_ops.lowerings import OP_TARGETS


def pick_op(ops: tuple, opset: int | None, for_ort: bool) -> tuple[str, str]:
    """The best target for the opset and runtime: the standard op where the opset has it, ORT's contrib
    op for ONNX Runtime below that, plain ops otherwise. Returns (op, why)."""
    if "onnx" in ops and (opset is None or opset in OP_TARGETS["onnx"].opsets()):
        return "onnx", "the standard RotaryEmbedding op of opset 23+"
    if "ort" in ops and for_ort and opset in OP_TARGETS["ort"].opsets():
        return "ort", f"ONNX Runtime's contrib RotaryEmbedding (opset {opset} has no standard op)"
    why = "any ONNX runtime" if "onnx" in ops else "the only target of this encoding"
    if "onnx" in ops and opset is not None and opset > max(OP_TARGETS["onnx"].opsets()):
        why = f"torch's exporter writes the fused ops up to opset {max(OP_TARGETS['onnx'].opsets())}"
    return "decomposed", f"plain ops ({why})"
