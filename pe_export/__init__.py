"""pe-export: positional encodings of Transformer models as verified ONNX graphs."""

__version__ = "0.1.0"
