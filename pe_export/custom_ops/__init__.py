"""Torch custom ops of pe-export and their ONNX lowerings (installed as `pe_export.custom_ops`)."""
