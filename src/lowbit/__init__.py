"""lowbit: make trained neural networks smaller and faster, and prove it.

Public API (heavy dependencies are imported only when a function is called)::

    import lowbit
    qm = lowbit.quantize("model.onnx", "calib.npz")   # or (torch_module, sample_arrays)
    qm.save("model.int8.onnx")                        # + model.int8.onnx.report.json
    cm = lowbit.compress("model.onnx", "train.npz", sparsity=0.95, bits=5, epochs=30)
    cm.save("model.lbz")
    cm = lowbit.compress("cnn.onnx", "train.npz", recipe="edge")   # or a YAML recipe file
    lowbit.export_tflite("cnn.keras", "cnn.tflite", data="train.npz")  # lowbit[tf]
    # any techniques, in order, over one in-memory model:
    r = lowbit.run("model.onnx", [lowbit.PruneConfig(sparsity=0.5, epochs=2),
                                  lowbit.Int8Config(mode="static")], data="train.npz")
"""

from __future__ import annotations

from typing import Any

_API = ("quantize", "prune", "cluster", "compress", "sensitivity", "read_mixed_plan", "evaluate",
        "bench", "inspect_model", "load", "run", "CompressedModel", "search_compression")
_CONFIG = ("Int8Config", "WeightOnlyConfig", "MixedPrecisionConfig", "PruneConfig",
           "StructuredPruneConfig", "ClusterConfig", "QuantMode", "CalibrationMethod",
           "WeightGranularity", "WeightOnlyAlgorithm", "PruneScope", "ChannelImportance",
           "ClusterInit", "Precision", "config_from_dict", "QatConfig", "DistillConfig",
           "DistillSettings")
_RECIPE = ("Recipe", "load_recipe", "builtin_recipes")
_EXPORT = ("export_tflite",)

__all__ = [*_API, *_CONFIG, *_RECIPE, *_EXPORT, "LowbitError", "__version__"]

from lowbit.errors import LowbitError  # noqa: E402  (cheap, no heavy imports)
from lowbit.version import __version__  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _API:
        from lowbit import api

        return getattr(api, name)
    if name in _CONFIG:
        from lowbit import config

        return getattr(config, name)
    if name in _EXPORT:
        from lowbit import export

        return getattr(export, name)
    if name in _RECIPE:
        from lowbit.config import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
