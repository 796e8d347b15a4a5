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
from lowbit.layouts import InputSpec

TFLITE_MAGIC = b"TFL3"


def is_tflite(path: Any) -> bool:
    """A file whose flatbuffer identifier (bytes 4-8) is TFL3."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(8)[4:8] == TFLITE_MAGIC


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
            out.append(InputSpec(d["name"], np.dtype(d["dtype"]), shape))
        return out

    def output_names(self) -> list[str]:
        return [d["name"] for d in self._outs]

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
            arr = np.asarray(feeds[d["name"]])
            self._it.set_tensor(d["index"], arr.astype(d["dtype"], copy=False))
        self._it.invoke()
        return [self._it.get_tensor(d["index"]).copy() for d in self._outs]

    def quantization(self) -> dict[str, tuple[float, int] | None]:
        """(scale, zero point) of every INT8 graph input/output, None for float ones."""
        out: dict[str, tuple[float, int] | None] = {}
        for d in list(self._ins) + list(self._outs):
            s, z = d.get("quantization", (0.0, 0))
            out[d["name"]] = (float(s), int(z)) if s else None
        return out
