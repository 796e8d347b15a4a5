"""ONNX Runtime sessions and side-by-side latency measurement."""
