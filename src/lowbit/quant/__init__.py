"""Quantization core: schemes (plain data), affine math, observers.

Nothing in this package imports torch or onnx; backends apply it.
"""
