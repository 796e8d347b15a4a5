"""PyTorch backend: export to ONNX, the ONNX->torch interpreter, the trainer."""
