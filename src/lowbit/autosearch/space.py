"""What the accuracy-aware search may choose from: the techniques and their per-layer
levels, the checked options, and the estimates that rank one choice against another
(bytes of a layer in the .lbz, multiply-accumulates of the whole model).

The estimates only order the choices; every configuration the search keeps is
measured for real (its .lbz bytes, or its latency timed beside the float model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import dims_of
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weighted_nodes
from lowbit.config import check_run_settings
from lowbit.config.values import check_integer, check_number
from lowbit.errors import ValidationError

OBJECTIVES = ("size", "latency")
TECHNIQUES = ("prune", "structured", "cluster", "int8")
DEFAULT_TECHNIQUES = {"size": ("prune", "cluster", "int8"), "latency": ("structured", "int8")}
# per-layer levels, mildest first
LEVELS: dict[str, tuple[float, ...]] = {
    "prune": (0.5, 0.7, 0.8, 0.9, 0.95),  # unstructured sparsity
    "structured": (0.25, 0.5, 0.75),  # fraction of output channels removed
    "cluster": (8, 6, 5, 4, 3),  # bits of the shared values (2**bits per layer)
    "int8": (6, 5, 4),  # INT8-kernel weights on a coarser grid (size, without clustering)
}
FLOAT_BITS = 32
MAX_BUDGET_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class SearchOptions:
    """The checked options of one search."""

    max_drop: float | None
    min_cosine: float | None
    budget_s: float
    objective: str
    techniques: tuple[str, ...]
    epochs: int
    threads: int
    seed: int

    @property
    def target(self) -> float:
        """The largest loss allowed: accuracy points, or 1 - cosine."""
        return float(self.max_drop) if self.max_drop is not None else 1.0 - float(self.min_cosine)

    def target_dict(self) -> dict[str, float]:
        return {"max_drop": self.max_drop} if self.max_drop is not None else \
            {"min_cosine": self.min_cosine}


def check_options(*, max_drop: Any, min_cosine: Any, budget_s: Any, objective: Any,
                  techniques: Any, epochs: Any, threads: Any, seed: Any) -> SearchOptions:
    """Every option checked before any work; each refusal names its option."""
    if (max_drop is None) == (min_cosine is None):
        raise ValidationError("options max_drop and min_cosine: give exactly one quality "
                              "target (max_drop in accuracy points with labels, or min_cosine)")
    if max_drop is not None:
        check_number(max_drop, "max_drop", 0.0, 100.0)
    if min_cosine is not None:
        check_number(min_cosine, "min_cosine", 0.0, 1.0, lo_open=True)
    check_number(budget_s, "budget_s", 0.0, MAX_BUDGET_S, lo_open=True)
    if not isinstance(objective, str) or objective.lower() not in OBJECTIVES:
        raise ValidationError(f"option objective: {objective!r} is not one of: "
                              f"{', '.join(OBJECTIVES)}")
    objective = objective.lower()
    check_integer(epochs, "epochs", 0, 1000)
    check_run_settings(threads=threads, seed=seed)
    return SearchOptions(max_drop=None if max_drop is None else float(max_drop),
                         min_cosine=None if min_cosine is None else float(min_cosine),
                         budget_s=float(budget_s), objective=objective,
                         techniques=_techniques(techniques, objective), epochs=int(epochs),
                         threads=int(threads), seed=int(seed))


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_budget(text: Any, option: str = "budget") -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"10m"``, ``"1.5h"`` (a CLI value); refused with
    the option named when it is not a positive duration.

    >>> parse_budget("10m")
    600.0
    """
    value = str(text).strip().lower()
    number = value.rstrip("smhin")
    unit = value[len(number):]
    try:
        seconds = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ValidationError(f"option {option}: {text!r} is not a duration such as 90s, 10m "
                              "or 1h") from None
    return check_number(seconds, option, 0.0, MAX_BUDGET_S, lo_open=True)


def _techniques(value: Any, objective: str) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_TECHNIQUES[objective]
    if isinstance(value, str):  # "prune,cluster" (a CLI value)
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple, set, frozenset)) or \
            not all(isinstance(v, str) for v in value):
        raise ValidationError(f"option techniques: expected names from {', '.join(TECHNIQUES)}, "
                              f"got {value!r}")
    names = [v.lower() for v in value]
    unknown = [v for v in names if v not in TECHNIQUES]
    if unknown:
        raise ValidationError(f"option techniques: unknown technique(s) {unknown}; known: "
                              f"{', '.join(TECHNIQUES)}")
    if not names:
        raise ValidationError(f"option techniques: name at least one of {', '.join(TECHNIQUES)}")
    return tuple(t for t in TECHNIQUES if t in names)  # (one order: the stage order)


@dataclass(frozen=True)
class Layer:
    """A weighted layer the search may compress: node name, weight, parameters, and its
    multiply-accumulates per sample (1 per weight where shapes are unknown)."""

    name: str
    weight: str
    op_type: str
    params: int
    macs: float
    out_axis: int  # the weight's output-channel axis


def _output_positions(node: onnx.NodeProto, shapes: dict[str, list[Any]]) -> float:
    """How many times the node's weight is used per sample: a Conv's output positions, a
    MatMul's rows beyond the batch axis (1 where unknown)."""
    dims = shapes.get(node.output[0]) if node.output else None
    if not dims:
        return 1.0
    rest = dims[2:] if node.op_type == "Conv" else dims[1:-1]
    return float(np.prod([d for d in rest if isinstance(d, int) and d > 0] or [1]))


def model_layers(fm: FloatModel) -> list[Layer]:
    """Every weighted layer with a usable constant weight, each weight once."""
    try:
        inferred = onnx.shape_inference.infer_shapes(fm.proto)
    except Exception:  # (shapes are only used to weigh layers against each other)
        inferred = fm.proto
    shapes = {v.name: dims_of(v.type.tensor_type) for v in
              [*inferred.graph.value_info, *inferred.graph.output]}
    seen: set[str] = set()
    out = []
    for item in weighted_nodes(fm)[0]:
        if item.weight in seen:
            continue
        seen.add(item.weight)
        w = fm.constant(item.weight)
        params = int(np.asarray(w).size) if w is not None else 0
        out.append(Layer(item.name, item.weight, item.op_type, params,
                         params * _output_positions(item.node, shapes), item.out_axis))
    return out


def total_macs(fm: FloatModel) -> float:
    return float(sum(layer.macs for layer in model_layers(fm)))


def _entropy_bits(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def estimated_bytes(params: float, *, sparsity: float = 0.0, value_bits: int = FLOAT_BITS,
                    codebook: bool = False) -> float:
    """Bytes of one weight in the .lbz: its nonzero values at ``value_bits``, the positions
    of the zeros (about their entropy), and a codebook of shared values."""
    nnz = params * (1.0 - sparsity)
    positions = 1.1 * params * _entropy_bits(sparsity) / 8.0 if sparsity > 0 else 0.0
    book = 4.0 * 2**value_bits if codebook else 0.0
    return nnz * value_bits / 8.0 + positions + book
