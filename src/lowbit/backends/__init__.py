"""Backends apply the backend-neutral algorithms to one framework's models.

- ``onnx``: load and normalise, the graph and its op registry, planners that fill a
  ``QuantizationPlan``, calibration through ONNX Runtime, the writers that render a
  plan (QDQ/dynamic INT8, MatMulNBits), structured rewrites, sessions.
- ``torch``: export, the ONNX->torch interpreter, the fine-tuning trainer and its hooks.

``torch`` builds on ``onnx`` (it interprets ONNX graphs), never the reverse.
"""
