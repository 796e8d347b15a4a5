"""TFLite out (issue 11): a writer that turns lowbit's float model and quantization plan
into a ``.tflite`` flatbuffer, a LiteRT session to verify and time it, and the candidate
search that keeps the fastest file meeting the quality target.

LiteRT (``ai-edge-litert``) is an optional extra: ``pip install "lowbit[tf]"``.
"""

from __future__ import annotations

import importlib
from typing import Any

from lowbit.errors import TF_EXTRA, ValidationError


def litert(module: str = "interpreter") -> Any:
    """``ai_edge_litert.<module>``, or one clear line saying which extra to install."""
    try:
        return importlib.import_module(f"ai_edge_litert.{module}")
    except ImportError:
        raise ValidationError(
            f"TFLite files need LiteRT (ai-edge-litert), which is not installed: {TF_EXTRA}"
        ) from None

