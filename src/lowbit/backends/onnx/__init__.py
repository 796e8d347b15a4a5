"""ONNX backend: loading, calibration through ONNX Runtime, QDQ/dynamic writers."""
