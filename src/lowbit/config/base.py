"""The base of every technique's config: ``StageConfig`` (frozen, typed, serialisable,
registered by ``kind``), the training options the training stages share, and
``config_from_dict``."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from lowbit.config.values import check_integer, check_number, parse_enum
from lowbit.errors import ValidationError

CONFIG_TYPES: dict[str, type[StageConfig]] = {}
C = TypeVar("C", bound="StageConfig")


@dataclass(frozen=True)
class StageConfig:
    """Base of every technique's config: ``kind`` names it in dicts and recipes."""

    kind: ClassVar[str] = ""
    trains: ClassVar[bool] = False  # may fine-tune (needs all training data, labels)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            CONFIG_TYPES[cls.kind] = cls

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"})
        if unknown:
            raise ValidationError(f"unknown {cls.kind} option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_from_dict(data: dict[str, Any]) -> StageConfig:
    """The config a dict describes (``kind`` picks the type)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in CONFIG_TYPES:
        raise ValidationError(f"unknown stage kind {kind!r}; known: {', '.join(sorted(CONFIG_TYPES))}")
    return CONFIG_TYPES[kind].from_dict(data)


class TrainingPrecision(str, enum.Enum):
    """The arithmetic of fine-tuning: float32, or bfloat16 autocast (weights stay float32)."""

    FP32 = "fp32"
    BF16 = "bf16"


@dataclass(frozen=True)
class TrainingOptions:
    """Fine-tuning options shared by the training stages (0 epochs: post-training)."""

    epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    precision: TrainingPrecision = TrainingPrecision.FP32

    def _check_training(self) -> None:
        check_integer(self.epochs, "epochs", 0)
        check_number(self.lr, "lr", 0.0, 10.0, lo_open=True)
        check_integer(self.batch_size, "batch_size", 1)
        self._set("precision", parse_enum(TrainingPrecision, self.precision, "precision"))
