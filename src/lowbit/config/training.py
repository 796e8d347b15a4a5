"""Configs of the training-aware techniques: quantization-aware training (a quantize
stage), knowledge distillation (a training stage of its own, and settings that wrap
every training stage of a run)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lowbit.config.base import StageConfig, TrainingOptions
from lowbit.config.values import (
    QuantMode,
    WeightGranularity,
    check_bool,
    check_group_size,
    check_integer,
    check_names,
    check_number,
    parse_enum,
)
from lowbit.errors import ValidationError
from lowbit.quant.observers import CalibrationMethod


class ActivationRange(str, enum.Enum):
    """How QAT moves an activation's quantization range while training."""

    EMA = "ema"  # follows the batches' min/max by a moving average
    LEARNED = "learned"  # scale and zero point learned by gradient (LSQ+)


class QatScheme(str, enum.Enum):
    """What QAT quantizes: the INT8 plan (weights at ``weight_bits`` in INT8 kernels,
    8-bit activations), or weights only (group-wise, MatMulNBits) for transformers."""

    INT8 = "int8"
    WEIGHT_ONLY = "weight-only"


class DistillLoss(str, enum.Enum):
    AUTO = "auto"  # kl for class outputs with labels, else mse
    KL = "kl"  # Hinton: soft targets at temperature T, scaled by T^2
    MSE = "mse"
    COSINE = "cosine"  # embeddings: 1 - cosine similarity per output row


@dataclass(frozen=True)
class QatConfig(TrainingOptions, StageConfig):
    """Quantization-aware training: the INT8 plan (``mode`` as in post-training), then
    fine-tuning with fake-quantized weights and activations; the trained weights and
    ranges are what the model is written with. ``weight_bits`` below 8 (W4A8 ...) keeps
    the INT8 kernels and stores weights on the coarser grid; ``layer_bits`` sets it per
    node. ``scheme`` weight-only: group-wise low-bit MatMul/Gemm weights (MatMulNBits),
    float activations. ``epochs`` 0: post-training quantization at those bits."""

    kind: ClassVar[str] = "quantize-qat"
    trains: ClassVar[bool] = True
    epochs: int = 2
    lr: float = 1e-4
    scheme: QatScheme = QatScheme.INT8
    group_size: int = 128  # weight-only: weights per scale along the input axis
    mode: QuantMode = QuantMode.AUTO
    weight_bits: int = 8
    layer_bits: tuple[tuple[str, int], ...] = ()
    activation_range: ActivationRange = ActivationRange.EMA
    calibration: CalibrationMethod = CalibrationMethod.AUTO
    weight_granularity: WeightGranularity = WeightGranularity.AUTO
    reduce_range: bool | None = None
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    search_time: float | None = None
    max_calibration_samples: int = 256

    def __post_init__(self) -> None:
        self._check_training()
        self._set("mode", parse_enum(QuantMode, self.mode, "mode"))
        self._set("scheme", parse_enum(QatScheme, self.scheme, "scheme"))
        check_group_size(self.group_size)
        self._set("activation_range", parse_enum(ActivationRange, self.activation_range,
                                                 "activation_range"))
        self._set("calibration", parse_enum(CalibrationMethod, self.calibration, "calibration"))
        self._set("weight_granularity", parse_enum(WeightGranularity, self.weight_granularity,
                                                   "weight_granularity"))
        check_integer(self.weight_bits, "weight_bits", 2, 8)
        items = self.layer_bits.items() if isinstance(self.layer_bits, dict) else self.layer_bits
        try:
            pairs = tuple((str(k), v) for k, v in items)
        except (TypeError, ValueError):
            raise ValidationError("option layer_bits: expected a mapping of node name to "
                                  "weight bits (2-8)") from None
        for name, bits in pairs:
            check_integer(bits, f"layer_bits[{name}]", 2, 8)
        self._set("layer_bits", pairs)
        if pairs and self.scheme is QatScheme.WEIGHT_ONLY:
            raise ValidationError("option layer_bits: applies to scheme int8; weight-only QAT "
                                  "uses weight_bits for every layer")
        self._set("exclude_nodes", check_names(self.exclude_nodes, "exclude_nodes"))
        check_bool(self.reduce_range, "reduce_range", optional=True)
        check_integer(self.max_calibration_samples, "max_calibration_samples", 1)
        if self.search_time is not None:
            check_number(self.search_time, "search_time", 0.0, 3600.0)

    def bits_of(self, node: str) -> int:
        return dict(self.layer_bits).get(node, self.weight_bits)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["layer_bits"] = dict(self.layer_bits)
        return out


@dataclass(frozen=True)
class DistillSettings:
    """How a teacher's outputs train a student: ``alpha`` is the weight of the teacher's
    loss (the labels' loss has ``1 - alpha``; without labels the teacher's loss is all
    there is); ``temperature`` softens both distributions for the ``kl`` loss."""

    temperature: float = 4.0
    alpha: float = 0.7
    loss: DistillLoss = DistillLoss.AUTO
    # weight of the intermediate-feature loss (tensors both graphs compute, same shape;
    # MSE relative to the teacher's mean square); 0: outputs only
    features: float = 0.0

    def __post_init__(self) -> None:
        check_number(self.temperature, "temperature", 0.0, 100.0, lo_open=True)
        check_number(self.alpha, "alpha", 0.0, 1.0)
        check_number(self.features, "features", 0.0, 100.0)
        object.__setattr__(self, "loss", parse_enum(DistillLoss, self.loss, "loss"))

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "alpha": self.alpha, "loss": self.loss.value,
                "features": self.features}


@dataclass(frozen=True)
class DistillConfig(TrainingOptions, StageConfig):
    """Train the current float model (a student) on the teacher's outputs for
    ``epochs``; the teacher is the run's original model unless the run names one."""

    kind: ClassVar[str] = "distill"
    trains: ClassVar[bool] = True
    epochs: int = 5
    temperature: float = 4.0
    alpha: float = 0.7
    loss: DistillLoss = DistillLoss.AUTO
    features: float = 0.0

    def __post_init__(self) -> None:
        self._check_training()
        if self.epochs < 1:
            raise ValidationError("option epochs: a distill stage trains for at least 1 epoch")
        self._set("loss", parse_enum(DistillLoss, self.loss, "loss"))
        self.settings  # noqa: B018  (checks temperature and alpha)

    @property
    def settings(self) -> DistillSettings:
        return DistillSettings(self.temperature, self.alpha, self.loss, self.features)
