"""lowbit: make trained neural networks smaller and faster, and prove it.

Public API (heavy dependencies are imported only when a function is called)::

    import lowbit
    qm = lowbit.quantize("model.onnx", "calib.npz")   # or (torch_module, sample_arrays)
    qm.save("model.int8.onnx")                        # + report.json beside it
    print(qm.report["agreement"])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["quantize", "evaluate", "bench", "inspect_model", "load", "QuantizedModel",
           "QuantizeConfig", "QuantMode", "CalibrationMethod", "LowbitError", "__version__"]

from lowbit.errors import LowbitError  # noqa: E402  (cheap, no heavy imports)


def __getattr__(name: str) -> Any:
    if name in ("quantize", "QuantizedModel", "evaluate", "bench", "load", "inspect_model"):
        from lowbit import api

        return getattr(api, name)
    if name in ("QuantizeConfig", "QuantMode", "CalibrationMethod"):
        from lowbit.quant import scheme

        return getattr(scheme, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
