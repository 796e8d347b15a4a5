"""PyTorch backend: export to ONNX and a small training loop."""
