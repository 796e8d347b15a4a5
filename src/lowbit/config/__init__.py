"""One frozen, typed, serialisable config per technique.

A config is what a user asks for; the stage registered for its type (see
``lowbit.pipeline``) does the work. Every field is checked when the config is
made, so a bad option fails before any work starts, naming the option::

    >>> PruneConfig(sparsity=0.9, epochs=5).to_dict()["kind"]
    'prune'
    >>> config_from_dict({"kind": "cluster", "bits": 5})
    ClusterConfig(bits=5, init=<ClusterInit.LINEAR: 'linear'>, ...)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lowbit.config.base import (
    CONFIG_TYPES,
    StageConfig,
    TrainingOptions,
    TrainingPrecision,
    config_from_dict,
)
from lowbit.config.training import (
    ActivationRange,
    DistillConfig,
    DistillLoss,
    DistillSettings,
    QatConfig,
    QatScheme,
)
from lowbit.config.values import (
    GROUP_SIZES,
    RUN_LIMITS,
    ChannelImportance,
    ClusterInit,
    Precision,
    PruneScope,
    QuantMode,
    WeightGranularity,
    WeightOnlyAlgorithm,
    check_bool,
    check_group_size,
    check_integer,
    check_names,
    check_number,
    check_run_settings,
    parse_enum,
)
from lowbit.errors import ValidationError
from lowbit.quant.observers import CalibrationMethod

__all__ = [
    "CONFIG_TYPES", "CalibrationMethod", "QuantMode", "WeightGranularity", "WeightOnlyAlgorithm",
    "PruneScope",
    "ChannelImportance", "ClusterInit", "Precision", "StageConfig", "Int8Config",
    "WeightOnlyConfig", "MixedPrecisionConfig", "PruneConfig", "StructuredPruneConfig",
    "ClusterConfig", "config_from_dict", "parse_enum", "check_run_settings", "RUN_LIMITS",
    "GROUP_SIZES", "QatConfig", "DistillConfig", "DistillSettings", "DistillLoss",
    "ActivationRange", "TrainingOptions", "TrainingPrecision", "QatScheme",
]


@dataclass(frozen=True)
class Int8Config(StageConfig):
    """INT8 post-training quantization (static QDQ and/or dynamic)."""

    kind: ClassVar[str] = "quantize-int8"
    mode: QuantMode = QuantMode.AUTO
    calibration: CalibrationMethod = CalibrationMethod.AUTO
    percentile: float = 99.99
    weight_granularity: WeightGranularity = WeightGranularity.AUTO
    # keep the most sensitive layers in float until the output cosine vs float (on
    # calibration samples) reaches min_cosine, or the accuracy drop is <= max_drop points
    min_cosine: float | None = None
    max_drop: float | None = None
    smoothquant: bool = True  # tried by default, and before layer fallback for a target
    # 7-bit weights (no u8s8 saturation); None: on when this CPU has no VNNI
    reduce_range: bool | None = None
    strict: bool = False
    batch_size: int = 32
    max_calibration_samples: int = 256
    embeddings: bool = True  # embedding tables (Gather on a constant) as 8-bit blocks
    # auto mode: seconds for timing its candidate models whole (None: the larger of 3 s
    # and 30% of the quantize time; 0: no search, the fixed rule only)
    search_time: float | None = None
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self._set("mode", parse_enum(QuantMode, self.mode, "mode"))
        self._set("calibration", parse_enum(CalibrationMethod, self.calibration, "calibration"))
        if self.mode is QuantMode.DYNAMIC and self.calibration is not CalibrationMethod.AUTO:
            raise ValidationError("option calibration: does not apply with mode dynamic (its "
                                  "activations are quantized at run time, not calibrated)")
        self._set("weight_granularity", parse_enum(WeightGranularity, self.weight_granularity,
                                                   "weight_granularity"))
        self._set("exclude_nodes", check_names(self.exclude_nodes, "exclude_nodes"))
        check_bool(self.smoothquant, "smoothquant")
        check_bool(self.embeddings, "embeddings")
        check_bool(self.strict, "strict")
        check_bool(self.reduce_range, "reduce_range", optional=True)
        if self.min_cosine is not None and self.max_drop is not None:
            raise ValidationError("options min_cosine and max_drop: give one quality target")
        if self.min_cosine is not None:
            check_number(self.min_cosine, "min_cosine", 0.0, 1.0, lo_open=True)
        if self.max_drop is not None:
            check_number(self.max_drop, "max_drop", 0.0, 100.0)
        check_number(self.percentile, "percentile", 50.0, 100.0, lo_open=True, hi_open=True)
        check_integer(self.batch_size, "batch_size", 1)
        check_integer(self.max_calibration_samples, "max_calibration_samples", 1)
        if self.search_time is not None:
            check_number(self.search_time, "search_time", 0.0, 3600.0)
            if self.mode is not QuantMode.AUTO:
                raise ValidationError(f"option search_time: applies to mode auto (its candidate "
                                      f"search), not {self.mode.value}")

    @property
    def has_quality_target(self) -> bool:
        return self.min_cosine is not None or self.max_drop is not None


@dataclass(frozen=True)
class WeightOnlyConfig(StageConfig):
    """2-8 bit group-wise MatMul/Gemm weights (MatMulNBits) and embedding tables.

    ``symmetric`` None means the algorithm's own default: symmetric for rtn and gptq,
    asymmetric for hqq (which fits zero points and cannot be symmetric)."""

    kind: ClassVar[str] = "quantize-weight-only"
    bits: int = 4
    group_size: int = 128
    algorithm: WeightOnlyAlgorithm = WeightOnlyAlgorithm.RTN
    symmetric: bool | None = None
    accuracy_level: int = 4  # MatMulNBits: 0 float math; 4 int8 activations (fast on VNNI)
    embeddings: bool = True  # also quantize Gather tables (GatherBlockQuantized)
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    batch_size: int = 8
    max_calibration_samples: int = 256

    @property
    def is_symmetric(self) -> bool:
        """``symmetric``, or the algorithm's default when it is None."""
        if self.symmetric is None:
            return self.algorithm is not WeightOnlyAlgorithm.HQQ
        return self.symmetric

    def __post_init__(self) -> None:
        check_integer(self.bits, "bits", 2, 8)
        check_group_size(self.group_size)
        self._set("algorithm", parse_enum(WeightOnlyAlgorithm, self.algorithm, "algorithm"))
        check_bool(self.symmetric, "symmetric", optional=True)
        if self.algorithm is WeightOnlyAlgorithm.HQQ and self.symmetric:
            raise ValidationError("option symmetric: hqq fits a zero point per group and is "
                                  "always asymmetric; drop the option or pick rtn/gptq")
        check_bool(self.embeddings, "embeddings")
        check_integer(self.accuracy_level, "accuracy_level", 0, 4)
        self._set("exclude_nodes", check_names(self.exclude_nodes, "exclude_nodes"))
        check_integer(self.batch_size, "batch_size", 1)
        check_integer(self.max_calibration_samples, "max_calibration_samples", 1)


@dataclass(frozen=True)
class MixedPrecisionConfig(StageConfig):
    """Per-layer INT4 / INT8 / float for MatMul/Gemm layers (from ``lowbit sensitivity``)."""

    kind: ClassVar[str] = "quantize-mixed"
    layers: tuple[tuple[str, Precision], ...] = ()
    group_size: int = 128

    def __post_init__(self) -> None:
        items = self.layers.items() if isinstance(self.layers, dict) else self.layers
        try:
            pairs = tuple((str(k), parse_enum(Precision, v, f"layers[{k}]")) for k, v in items)
        except (TypeError, ValueError):
            raise ValidationError("option layers: expected a mapping of layer name to "
                                  "int4 | int8 | float") from None
        self._set("layers", pairs)
        check_group_size(self.group_size)

    @property
    def precision(self) -> dict[str, Precision]:
        return dict(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": {k: v.value for k, v in self.layers},
                "group_size": self.group_size}


@dataclass(frozen=True)
class PruneConfig(TrainingOptions, StageConfig):
    """Unstructured magnitude pruning (gradual with epochs) or N:M semi-structured.

    ``layers``: node names of the Conv/Gemm/MatMul layers to prune (default all)."""

    kind: ClassVar[str] = "prune"
    trains: ClassVar[bool] = True
    sparsity: float | None = None  # default 0.5, or 1 - n/m with nm (which fixes it)
    scope: PruneScope = PruneScope.LAYER
    nm: tuple[int, int] | None = None
    layers: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self._set("scope", parse_enum(PruneScope, self.scope, "scope"))
        implied = 0.5
        if self.nm is not None:
            pair = tuple(self.nm) if isinstance(self.nm, (tuple, list)) else ()
            if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                         for v in pair) or not 1 <= pair[0] < pair[1]:
                raise ValidationError(f"option nm (n:m): need integers 1 <= n < m, got {self.nm!r}")
            self._set("nm", (int(pair[0]), int(pair[1])))
            implied = 1.0 - pair[0] / pair[1]
            if self.scope is PruneScope.GLOBAL:
                raise ValidationError("option scope: global does not apply to N:M pruning (each "
                                      "group of m keeps its n largest)")
        if self.sparsity is None:
            self._set("sparsity", implied)
        check_number(self.sparsity, "sparsity", 0.0, 1.0, hi_open=True)
        if self.nm is not None and abs(float(self.sparsity) - implied) > 1e-9:
            raise ValidationError(f"option sparsity: {self.sparsity} contradicts option nm "
                                  f"({self.nm[0]}:{self.nm[1]} removes {implied:g} of the "
                                  "weights); leave out option sparsity")
        self._set("layers", check_names(self.layers, "layers"))
        self._check_training()


@dataclass(frozen=True)
class StructuredPruneConfig(TrainingOptions, StageConfig):
    """Structured channel removal that physically shrinks Conv/Gemm/MatMul layers."""

    kind: ClassVar[str] = "prune-structured"
    trains: ClassVar[bool] = True
    sparsity: float = 0.5  # fraction of each layer's output channels removed
    importance: ChannelImportance = ChannelImportance.L1
    min_channels: int = 1
    layers: tuple[str, ...] = field(default_factory=tuple)
    # Conv channels kept in multiples of this (ONNX Runtime's fast layout); 0: this CPU's
    # block (8, or 16 with AVX-512), 1: exactly the sparsity
    channel_multiple: int = 0

    def __post_init__(self) -> None:
        check_number(self.sparsity, "sparsity", 0.0, 1.0, hi_open=True)
        check_integer(self.channel_multiple, "channel_multiple", 0, 64)
        self._set("importance", parse_enum(ChannelImportance, self.importance, "importance"))
        check_integer(self.min_channels, "min_channels", 1)
        self._set("layers", check_names(self.layers, "layers"))
        self._check_training()


@dataclass(frozen=True)
class ClusterConfig(TrainingOptions, StageConfig):
    """k-means weight sharing: at most 2**bits shared values per layer; zeros stay zero."""

    kind: ClassVar[str] = "cluster"
    trains: ClassVar[bool] = True
    bits: int = 5
    init: ClusterInit = ClusterInit.LINEAR
    biases: bool = True  # cluster each layer's bias too (own codebook)
    layers: tuple[str, ...] = field(default_factory=tuple)
    lr: float = 1e-4

    def __post_init__(self) -> None:
        check_integer(self.bits, "bits", 1, 8)
        self._set("init", parse_enum(ClusterInit, self.init, "init"))
        check_bool(self.biases, "biases")
        self._set("layers", check_names(self.layers, "layers"))
        self._check_training()
