"""Run a ``.tflite`` model in LiteRT's interpreter (XNNPACK, as phones run it) behind the
same ``run(None, feeds)`` call as an ONNX Runtime session, so every timing and
evaluation helper takes either."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.backends.tflite import litert
from lowbit.errors import ModelLoadError
from lowbit.fileio import has_magic
from lowbit.layouts import InputSpec

TFLITE_MAGIC = b"TFL3"


def is_tflite(path: Any) -> bool:
    """A file whose flatbuffer identifier (bytes 4-8) is TFL3."""
    return has_magic(path, TFLITE_MAGIC, offset=4)


class TfliteSession:
    """A LiteRT interpreter that resizes its inputs to each feed's batch."""

    def __init__(self, model: bytes | str | os.PathLike[str], *, threads: int = 1,
                 source: str | None = None) -> None:
        Interpreter = litert("interpreter").Interpreter
        content = Path(model).read_bytes() if not isinstance(model, bytes) else model
        self.source = source or (str(model) if not isinstance(model, bytes) else "model")
        self.content = content
        try:
            self._it = Interpreter(model_content=content, num_threads=threads)
            self._it.allocate_tensors()
        except Exception as exc:
            raise ModelLoadError(f"{self.source}: LiteRT cannot load this TFLite model: "
                                 f"{str(exc).strip().splitlines()[-1]}") from None
        self._ins = self._it.get_input_details()
        self._outs = self._it.get_output_details()
        self._shapes: dict[str, tuple[int, ...]] = {}

    def get_inputs(self) -> list[InputSpec]:
        out = []
        for d in self._ins:
            sig = d.get("shape_signature", d["shape"])
            shape = tuple(None if int(s) < 0 else int(s) for s in sig)
            dtype = np.dtype(np.float32) if d["dtype"] == np.int8 else np.dtype(d["dtype"])
            out.append(InputSpec(d["name"], dtype, shape))  # (INT8 inputs take float data)
        return out

    def output_names(self) -> list[str]:
        return [d["name"] for d in self._outs]

    def output_shape(self) -> tuple[int | None, ...]:
        d = self._outs[0]
        return tuple(None if int(s) < 0 else int(s) for s in d.get("shape_signature", d["shape"]))

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        resized = False
        for d in self._ins:
            arr = np.asarray(feeds[d["name"]])
            if self._shapes.get(d["name"]) != arr.shape:
                self._it.resize_tensor_input(d["index"], list(arr.shape))
                self._shapes[d["name"]] = arr.shape
                resized = True
        if resized:
            self._it.allocate_tensors()
        for d in self._ins:
            self._it.set_tensor(d["index"], _to_input(np.asarray(feeds[d["name"]]), d))
        self._it.invoke()
        return [_from_output(self._it.get_tensor(d["index"]), d) for d in self._outs]


def _to_input(arr: np.ndarray, d: dict[str, Any]) -> np.ndarray:
    """Float data for an INT8 input is quantized with the input's own parameters."""
    dtype = np.dtype(d["dtype"])
    scale, zp = d.get("quantization", (0.0, 0))
    if dtype == np.int8 and arr.dtype.kind == "f" and scale:
        return np.clip(np.round(arr / scale) + zp, -128, 127).astype(np.int8)
    return arr.astype(dtype, copy=False)


def _from_output(arr: np.ndarray, d: dict[str, Any]) -> np.ndarray:
    """An INT8 output is returned as the float values it stands for."""
    scale, zp = d.get("quantization", (0.0, 0))
    if arr.dtype == np.int8 and scale:
        return (arr.astype(np.float32) - zp) * np.float32(scale)
    return arr.copy()
