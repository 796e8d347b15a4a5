"""Quantization parameters as plain data.

A ``TensorQuantParams`` record is everything a writer needs to quantize one
tensor: bits, signedness, symmetry, granularity, scale and zero point.
Observers, weight rules, GPTQ/HQQ (and later QAT) produce these records inside a
``quant.plan.QuantizationPlan``; writers consume them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np


class Granularity(str, enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


@dataclass(frozen=True)
class TensorQuantParams:
    """How one tensor is quantized.

    ``scale`` and ``zero_point`` are scalars (granularity tensor), 1-D arrays
    along ``axis`` (granularity channel), or, for granularity group, arrays of
    the tensor's shape except that ``axis`` (cut into consecutive groups of
    ``group_size`` elements, the last one possibly shorter) has
    ceil(size / group_size) entries: an (N, K) weight with axis=1 has (N, ceil(K/g)).

    >>> p = TensorQuantParams(bits=8, signed=False, symmetric=False,
    ...                       granularity=Granularity.TENSOR, scale=np.float32(0.1),
    ...                       zero_point=np.int64(3))
    >>> p.qmin, p.qmax
    (0, 255)
    """

    bits: int
    signed: bool
    symmetric: bool
    granularity: Granularity
    scale: np.ndarray | np.floating[Any]
    zero_point: np.ndarray | np.integer[Any]
    axis: int | None = None
    narrow_range: bool = False  # symmetric int8 weights use [-127, 127]
    group_size: int | None = None  # granularity group only

    def __post_init__(self) -> None:
        if self.granularity is Granularity.GROUP and (
                self.axis is None or self.group_size is None or int(self.group_size) < 1):
            raise ValueError("group granularity needs an axis and a group_size >= 1")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "granularity": self.granularity.value,
            "scale": np.asarray(self.scale, dtype=np.float32).tolist(),
            "zero_point": np.asarray(self.zero_point, dtype=np.int64).tolist(),
            "axis": self.axis,
            "narrow_range": self.narrow_range,
            "group_size": self.group_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorQuantParams:
        return cls(
            bits=int(data["bits"]),
            signed=bool(data["signed"]),
            symmetric=bool(data["symmetric"]),
            granularity=Granularity(data["granularity"]),
            scale=np.asarray(data["scale"], dtype=np.float32),
            zero_point=np.asarray(data["zero_point"], dtype=np.int64),
            axis=data.get("axis"),
            narrow_range=bool(data.get("narrow_range", False)),
            group_size=None if data.get("group_size") is None else int(data["group_size"]),
        )
