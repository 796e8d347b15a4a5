"""lowbit: make trained neural networks smaller and faster, and prove it.

Public API (heavy dependencies are imported only when a function is called)::

    import lowbit
    qm = lowbit.quantize("model.onnx", "calib.npz")   # or (torch_module, sample_arrays)
    qm.save("model.int8.onnx")                        # + report.json beside it
    cm = lowbit.compress("model.onnx", "train.npz", sparsity=0.95, bits=5, epochs=30)
    cm.save("model.lbz")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["quantize", "prune", "cluster", "compress", "evaluate", "bench", "inspect_model",
           "load", "QuantizedModel", "CompressedModel",
           "QuantizeConfig", "QuantMode", "CalibrationMethod", "LowbitError", "__version__"]

from lowbit.errors import LowbitError  # noqa: E402  (cheap, no heavy imports)


def __getattr__(name: str) -> Any:
    if name in ("quantize", "QuantizedModel", "evaluate", "bench", "load", "inspect_model"):
        from lowbit import api

        return getattr(api, name)
    if name in ("prune", "cluster", "compress", "CompressedModel"):
        from lowbit import workflow

        return getattr(workflow, name)
    if name in ("QuantizeConfig", "QuantMode", "CalibrationMethod"):
        from lowbit.quant import scheme

        return getattr(scheme, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
