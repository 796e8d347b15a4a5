"""Quantization parameters as plain data.

A ``TensorQuantParams`` record is everything a writer needs to quantize one
tensor: bits, signedness, symmetry, granularity, scale and zero point.
Calibrators (and later QAT and mixed-precision plans) produce these records;
the ONNX writer consumes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from lowbit.errors import ValidationError


class QuantMode(str, enum.Enum):
    AUTO = "auto"
    STATIC = "static"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight-only"


class CalibrationMethod(str, enum.Enum):
    AUTO = "auto"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"


class WeightGranularity(str, enum.Enum):
    """INT8 weight granularity of static MatMul/Gemm (Conv is always per channel).

    auto: per tensor where that is as good (see ``onnx.qdq``), else per channel.
    """

    AUTO = "auto"
    CHANNEL = "channel"
    TENSOR = "tensor"


class Granularity(str, enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


def parse_enum(enum_type: type[enum.Enum], value: Any, option: str) -> Any:
    """Turn a user value into ``enum_type``, with an error naming the option."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).lower())
    except ValueError:
        choices = ", ".join(str(m.value) for m in enum_type)
        raise ValidationError(f"option {option}: {value!r} is not one of: {choices}") from None


@dataclass(frozen=True)
class TensorQuantParams:
    """How one tensor is quantized.

    ``scale`` and ``zero_point`` are scalars (granularity tensor) or 1-D arrays
    along ``axis`` (granularity channel).

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
        )


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of ``lowbit.quantize``; frozen, serialisable with to_dict/from_dict.

    >>> QuantizeConfig(mode=QuantMode.STATIC).to_dict()["mode"]
    'static'
    """

    mode: QuantMode = QuantMode.AUTO
    calibration: CalibrationMethod = CalibrationMethod.AUTO
    bits: int = 8
    percentile: float = 99.99
    weight_granularity: WeightGranularity = WeightGranularity.AUTO
    # weight-only mode (2-8 bit group-wise MatMul/Gemm weights, MatMulNBits)
    group_size: int = 128
    algorithm: str = "rtn"
    symmetric: bool = True
    accuracy_level: int = 4
    # INT8 modes: keep the most sensitive layers in float until the mean output cosine
    # against float (on calibration samples) reaches this; None: no target
    min_cosine: float | None = None
    smoothquant: bool = True  # with a quality target: try SmoothQuant before layer fallback
    # INT8 modes: the same search with "accuracy drop <= max_drop points" (needs labels)
    max_drop: float | None = None
    strict: bool = False
    batch_size: int = 32
    max_calibration_samples: int = 256
    holdout_fraction: float = 0.2
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_enum(QuantMode, self.mode, "mode"))
        object.__setattr__(
            self, "calibration", parse_enum(CalibrationMethod, self.calibration, "calibration")
        )
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        object.__setattr__(self, "weight_granularity", parse_enum(
            WeightGranularity, self.weight_granularity, "weight_granularity"))
        if self.max_drop is not None and not 0.0 <= float(self.max_drop) <= 100.0:
            raise ValidationError(f"option max_drop: {self.max_drop} must be in [0, 100] points")
        if self.min_cosine is not None and self.max_drop is not None:
            raise ValidationError("options min_cosine and max_drop: give one quality target")
        if self.min_cosine is not None and not 0.0 < float(self.min_cosine) <= 1.0:
            raise ValidationError(f"option min_cosine: {self.min_cosine} must be in (0, 1]")
        if self.mode is QuantMode.WEIGHT_ONLY:
            from lowbit.onnx.weight_only import WeightOnlyConfig

            WeightOnlyConfig(self.bits, self.group_size, self.algorithm, self.symmetric,
                             self.accuracy_level)  # validates the weight-only options
        elif self.bits != 8:
            raise ValidationError(
                f"option bits: {self.bits} needs --mode weight-only (static, dynamic and auto "
                "modes are INT8)"
            )
        if not 50.0 < float(self.percentile) < 100.0:
            raise ValidationError(f"option percentile: {self.percentile} must be in (50, 100)")
        if int(self.batch_size) < 1:
            raise ValidationError(f"option batch_size: {self.batch_size} must be >= 1")
        if int(self.max_calibration_samples) < 1:
            raise ValidationError(
                f"option max_calibration_samples: {self.max_calibration_samples} must be >= 1"
            )
        if not 0.0 <= float(self.holdout_fraction) < 1.0:
            raise ValidationError(
                f"option holdout_fraction: {self.holdout_fraction} must be in [0, 1)"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValidationError(f"unknown quantize option(s): {', '.join(unknown)}")
        return cls(**data)
