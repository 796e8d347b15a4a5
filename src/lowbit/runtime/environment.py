"""The machine and library versions a measurement was taken on (recorded in reports)."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

import numpy as np

from lowbit.version import __version__


def cpu_info() -> dict[str, Any]:
    """CPU model, core count, and whether it has VNNI int8 dot-product instructions."""
    return dict(_cpu_info())  # a copy: callers put it into reports


@lru_cache(maxsize=1)
def _cpu_info() -> dict[str, Any]:  # /proc/cpuinfo is read once per process
    model_name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model_name in ("", platform.machine()):
                    model_name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    vnni: bool | None = None
    if flags:
        vnni = bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags)
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "vnni": vnni,
        "avx512": bool({"avx512f"} & flags) if flags else None,
        # Intel AMX int8 tiles: ONNX Runtime's MLAS uses them for U8S8 GEMMs where present
        "amx_int8": bool({"amx_int8"} & flags) if flags else None,
        # bfloat16 arithmetic in hardware (without it torch emulates bf16 matmuls)
        "bf16": bool({"avx512_bf16", "amx_bf16"} & flags) if flags else None,
    }


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    out["lowbit"] = __version__
    return out
