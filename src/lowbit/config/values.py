"""The values a config may take: the enums users see, and the checks every config field
goes through (each refusal names the option)."""

from __future__ import annotations

import enum
import math
from typing import Any, TypeVar

from lowbit.errors import ValidationError
from lowbit.quant.groupwise import GROUP_SIZES


class QuantMode(str, enum.Enum):
    """INT8 modes. auto: Conv static; MatMul/Gemm static when fed 8-bit data, else dynamic."""

    AUTO = "auto"
    STATIC = "static"
    DYNAMIC = "dynamic"


class WeightGranularity(str, enum.Enum):
    """INT8 weight granularity of static MatMul/Gemm (Conv is always per channel)."""

    AUTO = "auto"
    CHANNEL = "channel"
    TENSOR = "tensor"


class WeightOnlyAlgorithm(str, enum.Enum):
    RTN, GPTQ, HQQ = "rtn", "gptq", "hqq"


class PruneScope(str, enum.Enum):
    LAYER, GLOBAL = "layer", "global"


class ChannelImportance(str, enum.Enum):
    """How output channels are ranked: weight norm of the filter, or |gamma| of the next BN."""

    L1 = "l1"
    L2 = "l2"
    BN = "bn"


class ClusterInit(str, enum.Enum):
    LINEAR, DENSITY, RANDOM = "linear", "density", "random"


class Precision(str, enum.Enum):
    """Per-layer precision in a mixed-precision plan."""

    INT4 = "int4"
    INT8 = "int8"
    FLOAT = "float"


E = TypeVar("E", bound=enum.Enum)



def parse_enum(enum_type: type[E], value: Any, option: str) -> E:
    """Turn a user value into ``enum_type``, with an error naming the option."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).lower())
    except ValueError:
        choices = ", ".join(str(m.value) for m in enum_type)
        raise ValidationError(f"option {option}: {value!r} is not one of: {choices}") from None


def check_number(value: Any, option: str, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValidationError(f"option {option}: {value!r} must be a number in {left}{lo}, {hi}{right}")
    return float(value)


def check_bool(value: Any, option: str, *, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ValidationError(f"option {option}: {value!r} must be true or false")


def check_names(value: Any, option: str) -> tuple[str, ...]:
    """A tuple of node names; a bare string is refused (it would split into characters)."""
    if isinstance(value, (str, bytes)) or not all(isinstance(v, str) for v in value):
        raise ValidationError(f"option {option}: expected a list of node names, got {value!r}")
    return tuple(value)


def check_group_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in GROUP_SIZES:
        raise ValidationError(f"option group_size: {value!r} must be one of "
                              f"{', '.join(map(str, GROUP_SIZES))}")
    return int(value)


# bounds of a run's settings (threads, batch, ...; not a technique's): beyond them, a typo
RUN_LIMITS = {"threads": (1, 1024), "batch": (1, 65536), "iterations": (1, 1_000_000),
              "epochs": (1, 100_000), "seed": (0, 2**32 - 1)}


def check_run_settings(**values: Any) -> None:
    for name, value in values.items():
        check_integer(value, name, *RUN_LIMITS[name])


def check_integer(value: Any, option: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or \
            (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ValidationError(f"option {option}: {value!r} must be an integer {bound}")
    return int(value)

