"""The export pipeline: a spec to a checked, packaged ONNX file, then verified."""
