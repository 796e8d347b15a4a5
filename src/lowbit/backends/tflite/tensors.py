"""The writer's view of every ONNX tensor as TFLite tensors.

An ONNX tensor may exist in the TFLite graph as a float tensor, an INT8 tensor, or both
(QUANTIZE / DEQUANTIZE ops are added on first use, once). It also has a *layout*: TFLite
convolutions work on NHWC, ONNX's on NCHW, so a 4-D activation is stored with its axes
permuted; ``perm[name]`` says how (physical = logical.transpose(perm)). An ONNX Transpose
only changes the permutation: no TFLite op. Ops that need the logical order (Reshape,
Flatten) get a TRANSPOSE first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.backends.tflite.flatbuffer import FlatBuilder, Quant
from lowbit.quant.scheme import TensorQuantParams

NHWC = (0, 2, 3, 1)


def identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def scalar(value: Any) -> float | None:
    """A one-element constant as a float (None if absent or not one element)."""
    if value is None or np.asarray(value).size != 1:
        return None
    return float(np.asarray(value).reshape(-1)[0])


def int8_quant(params: TensorQuantParams) -> Quant:
    """TFLite INT8 parameters of an 8-bit activation: an unsigned plan (zero point in
    [0, 255]) is the same grid shifted by 128."""
    if params.bits != 8:
        raise ValueError(f"internal: {params.bits}-bit activation")
    zp = np.asarray(params.zero_point, dtype=np.int64)
    return Quant.of(params.scale, zp if params.signed else zp - 128)


class TensorTable:
    """Float / INT8 versions, shapes and layouts of the ONNX tensors written so far."""

    def __init__(self, builder: FlatBuilder, shapes: dict[str, tuple[int, ...]],
                 dynamic_batch: set[str]) -> None:
        self.b = builder
        self.shapes = shapes  # logical ONNX shapes (a dynamic batch as 1)
        self.dynamic_batch = dynamic_batch  # tensors whose first axis is the batch
        self.float: dict[str, int] = {}
        self.int8: dict[str, tuple[int, Quant]] = {}
        self.perm: dict[str, tuple[int, ...]] = {}
        self._consts: dict[tuple[Any, ...], int] = {}

    # ------------------------------------------------------------------ shapes
    def physical_shape(self, name: str) -> tuple[int, ...]:
        shape = self.shapes[name]
        return tuple(shape[p] for p in self.perm.get(name, identity(len(shape))))

    def layout(self, name: str) -> tuple[int, ...]:
        return self.perm.get(name, identity(len(self.shapes[name])))

    def new(self, name: str, dtype: str, quant: Quant | None = None, *,
            label: str | None = None) -> int:
        """A fresh activation tensor for ONNX tensor ``name`` (its physical shape), named
        ``label`` (default: ``name``, with the type appended unless float)."""
        shape = self.physical_shape(name)
        sig = None
        if name in self.dynamic_batch:
            batch_axis = self.layout(name).index(0)
            sig = tuple(-1 if i == batch_axis else d for i, d in enumerate(shape))
        if label is None:
            label = name if dtype == "float32" else f"{name}/{dtype}"
        return self.b.tensor(label, shape, dtype, quant=quant, signature=sig)

    def new_float(self, name: str, perm: tuple[int, ...]) -> int:
        """A fresh float tensor for ONNX tensor ``name`` stored in layout ``perm``,
        registered as its float version (an op's output)."""
        self.perm[name] = perm
        index = self.new(name, "float32")
        self.float[name] = index
        return index

    # ------------------------------------------------------------------ versions
    def set_float(self, name: str, index: int, perm: tuple[int, ...] | None = None) -> None:
        self.float[name] = index
        if perm is not None:
            self.perm[name] = perm

    def set_int8(self, name: str, index: int, quant: Quant,
                 perm: tuple[int, ...] | None = None) -> None:
        self.int8[name] = (index, quant)
        if perm is not None:
            self.perm[name] = perm

    def alias(self, new: str, old: str, perm: tuple[int, ...] | None = None) -> None:
        """``new`` is ``old``'s data (Identity, Dropout, a Transpose that only relabels)."""
        if old in self.float:
            self.float[new] = self.float[old]
        if old in self.int8:
            self.int8[new] = self.int8[old]
        self.perm[new] = perm if perm is not None else self.layout(old)

    def has(self, name: str) -> bool:
        return name in self.float or name in self.int8

    def float_of(self, name: str) -> int:
        if name not in self.float:
            src, _ = self.int8[name]
            out = self.new(name, "float32")
            self.b.op("DEQUANTIZE", [src], [out], version=2)
            self.float[name] = out
        return self.float[name]

    def int8_of(self, name: str, quant: Quant) -> int:
        """``name`` as INT8 with ``quant``: the existing INT8 tensor, a requantized copy,
        or a QUANTIZE of the float tensor."""
        have = self.int8.get(name)
        if have is not None and have[1] == quant:
            return have[0]
        key = ("int8", name, quant)
        if key not in self._consts:
            src = have[0] if have is not None else self.float[name]
            out = self.new(name, "int8", quant)
            self.b.op("QUANTIZE", [src], [out], version=2)
            self._consts[key] = out
            if have is None:
                self.int8[name] = (out, quant)
        return self._consts[key]

    # ------------------------------------------------------------------ layout
    def to_layout(self, name: str, want: tuple[int, ...], dtype: str = "float32",
                  quant: Quant | None = None) -> int:
        """``name`` (float, or INT8 with ``quant``) physically in layout ``want``: the
        tensor itself, or a TRANSPOSE of it (made once)."""
        src = self.float_of(name) if dtype == "float32" else self.int8_of(name, quant)
        have = self.layout(name)
        if have == want:
            return src
        key = ("transpose", name, want, dtype, quant)
        if key not in self._consts:
            # physical_new[j] = logical[want[j]] = physical_old[inv(have)[want[j]]]
            inv = inverse(have)
            order = tuple(inv[w] for w in want)
            shape = tuple(self.shapes[name][w] for w in want)
            sig = None
            if name in self.dynamic_batch:
                sig = tuple(-1 if w == 0 else d for w, d in zip(want, shape))
            out = self.b.tensor(f"{name}/transposed", shape, dtype, quant=quant, signature=sig)
            moved = [a for a in have if self.shapes[name][a] != 1]
            if moved == [a for a in want if self.shapes[name][a] != 1]:
                # only size-1 axes move (e.g. NCHW -> NHWC with one channel): a reshape
                target = np.asarray(sig if sig is not None else shape, dtype=np.int32)
                self.b.op("RESHAPE", [src, self.b.constant(f"{name}/shape", target)], [out],
                          *self.b.options("ReshapeOptions", newShape=[int(d) for d in target]))
            else:
                perm_t = self.b.constant(f"{name}/perm", np.asarray(order, dtype=np.int32))
                self.b.op("TRANSPOSE", [src, perm_t], [out])
            self._consts[key] = out
        return self._consts[key]

    def const(self, key: Any, make: Any) -> int:
        """A constant tensor made once per ``key`` (``make()`` returns its index)."""
        if key not in self._consts:
            self._consts[key] = make()
        return self._consts[key]
