"""Per-layer sensitivity, post-training: each level of each technique applied to one layer
alone (no fine-tuning), and the loss it causes on calibration samples.

The loss is in the target's units: accuracy points lost (plus 1 - cosine, a small
tie-breaker among levels that change no prediction on the samples), or 1 - cosine.
Measuring stops at the deadline it is given (largest layers first, so a cut-short
table still covers what matters most); a level that was not measured is not chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.autosearch.space import Layer, total_macs
from lowbit.backends.onnx.session import make_session, run_batches, work_threads
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.structured import (
    apply_channel_pruning,
    conv_channel_block,
    plan_channel_pruning,
)
from lowbit.backends.torch.finetune import with_weights
from lowbit.clustering.kmeans import kmeans_1d
from lowbit.data import Dataset
from lowbit.errors import DataError, LowbitError
from lowbit.metrics import accuracy, mean_cosine
from lowbit.pruning.magnitude import layer_mask
from lowbit.quant import affine

# Below this output cosine (or with half the accuracy lost) a level has collapsed the
# model: the stronger levels of that technique on that layer count as at least as bad,
# unmeasured.
COLLAPSED_COSINE = 0.5


@dataclass(frozen=True)
class Measured:
    """Quality of a model's outputs against the float model's on a sample set."""

    cosine: float
    accuracy: float | None  # points (0-100), with labels
    drop_points: float | None  # float accuracy minus this one's, in points


class Scorer:
    """Runs models on ``data`` and compares them with the float model's outputs there
    (``reference``); ``session_seconds`` and ``run_seconds``: what making the float
    model's session and one pass over ``data`` took."""

    def __init__(self, data: Dataset, reference: list[np.ndarray], *, by_accuracy: bool,
                 threads: int = 1, session_seconds: float = 0.0, run_seconds: float = 0.0
                 ) -> None:
        self.data, self.reference, self.by_accuracy = data, reference, by_accuracy
        self.threads, self.session_seconds, self.run_seconds = threads, session_seconds, run_seconds
        acc = accuracy(reference[0], data.labels) if data.labels is not None else None
        self.float_accuracy = None if acc is None else 100.0 * acc
        if by_accuracy and self.float_accuracy is None:
            raise DataError(f"{data.source}: option max_drop needs labels ('y') and a classifier "
                            "output (batch, classes); without them use min_cosine")

    @classmethod
    def of(cls, fm: FloatModel, data: Dataset, *, by_accuracy: bool, threads: int = 1) -> Scorer:
        """A scorer against ``fm``'s outputs on ``data`` (run once here)."""
        start = time.perf_counter()
        session = make_session(fm, threads=work_threads(threads), name="float model")
        made = time.perf_counter()
        reference = run_batches(session, data, 64)
        return cls(data, reference, by_accuracy=by_accuracy, threads=threads,
                   session_seconds=made - start, run_seconds=time.perf_counter() - made)

    @property
    def pass_seconds(self) -> float:
        """One candidate's session and pass over the data."""
        return self.session_seconds + self.run_seconds

    def take(self, n: int) -> Scorer:
        """The same scorer on ``n`` samples spread over the data (the reference sliced,
        not rerun)."""
        total = self.data.num_samples
        if n >= total:
            return self
        if self.data.whole:  # (outputs of whole samples need not be one row each)
            part, ref = self.data.take(0, n), [r[: len(r) * n // total] for r in self.reference]
        else:
            idx = spread(total, n)
            part, ref = subset(self.data, idx), [r[idx] for r in self.reference]
        return Scorer(part, ref, by_accuracy=self.by_accuracy, threads=self.threads,
                      session_seconds=self.session_seconds,
                      run_seconds=self.run_seconds * n / total)

    def measure(self, model: Any) -> Measured:
        outs = run_batches(make_session(model, threads=work_threads(self.threads),
                                        name="candidate"), self.data, 64)
        cos = float(np.mean([mean_cosine(r, o) for r, o in zip(self.reference, outs)]))
        if self.data.labels is None or self.float_accuracy is None:
            return Measured(cos, None, None)
        acc = accuracy(outs[0], self.data.labels)
        points = None if acc is None else 100.0 * acc
        return Measured(cos, points, None if points is None else self.float_accuracy - points)

    def loss(self, m: Measured) -> float:
        """The loss in the target's units (accuracy points, or 1 - cosine)."""
        if self.by_accuracy:
            return float(m.drop_points if m.drop_points is not None else 100.0)
        return 1.0 - m.cosine

    def ranking_loss(self, m: Measured) -> float:
        """``loss``, with ties in accuracy broken by how far the outputs moved."""
        if self.by_accuracy:
            return max(0.0, self.loss(m)) + (1.0 - m.cosine)
        return max(0.0, 1.0 - m.cosine)

    def collapsed(self, m: Measured) -> bool:
        if self.by_accuracy and m.drop_points is not None and self.float_accuracy:
            return m.drop_points >= 0.5 * self.float_accuracy
        return m.cosine < COLLAPSED_COSINE


def spread(total: int, n: int) -> np.ndarray:
    """``n`` sample indices spread evenly over ``total`` (data sorted by class still gives
    every class)."""
    return np.unique(np.linspace(0, total - 1, max(1, min(n, total))).round().astype(np.int64))


def subset(data: Dataset, idx: np.ndarray) -> Dataset:
    """The samples ``idx`` of ``data`` (rows: one output row per sample)."""
    if data.whole:
        return data.take(0, len(idx))
    return Dataset({k: v[idx] for k, v in data.inputs.items()},
                   None if data.labels is None else data.labels[idx], data.source,
                   data.fixed_batch, data.whole, data.label_rows)


@dataclass
class Sensitivity:
    """Loss per layer, technique and level (None: not measured or not possible); for
    structured pruning also the multiply-accumulates it removes from the whole model."""

    levels: dict[str, tuple[float, ...]]
    losses: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    macs_saved: dict[str, list[float | None]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # "layer/technique": why not measured
    collapsed: dict[str, float] = field(default_factory=dict)  # "layer/technique": from level
    samples: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    complete: bool = True

    def envelope(self, layer: str, technique: str) -> list[float | None]:
        """Losses made non-decreasing with the level (a stronger level is never assumed
        better than a milder one); None from the first level not measured on."""
        out: list[float | None] = []
        worst = 0.0
        for value in self.losses.get(layer, {}).get(technique, []):
            if value is None or (out and out[-1] is None):
                out.append(None)
                continue
            worst = max(worst, value)
            out.append(worst)
        return out

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for layer, by_tech in self.losses.items():
            row: dict[str, Any] = {"layer": layer}
            for tech, values in by_tech.items():
                row[tech] = {_level_key(tech, lv): (None if v is None else round(v, 5))
                             for lv, v in zip(self.levels[tech], values)}
            rows.append(row)
        return {"samples": self.samples, "evaluations": self.evaluations,
                "seconds": round(self.seconds, 2), "complete": self.complete,
                "not_measured": self.reasons, "collapsed_from": self.collapsed, "layers": rows}


def _level_key(technique: str, level: float) -> str:
    return f"{int(level)} bits" if technique in ("cluster", "int8") else f"{level:g}"


def _coarse_grid(w: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Symmetric per-channel rounding to ``bits`` (the grid QAT's coarser weights use)."""
    params = affine.weight_params_per_channel(w, axis=axis, bits=bits)
    return affine.dequantize(affine.quantize(w, params), params).astype(np.float32)


def variant(fm: FloatModel, layer: Layer, technique: str, level: float) -> FloatModel | str:
    """``fm`` with only ``layer`` changed by ``technique`` at ``level``, or why it cannot be."""
    if technique == "structured":
        plan = plan_channel_pruning(fm, ratio=float(level), layers={layer.name},
                                    channel_block=conv_channel_block())  # (as the stage)
        if layer.name not in plan.keep:
            return plan.skipped.get(layer.name, "no output channel can be removed")
        return apply_channel_pruning(fm, plan)
    w = np.asarray(fm.constant(layer.weight), dtype=np.float32)
    if technique == "prune":
        if round(w.size * (1 - level)) < 1:
            return f"too small to prune to {level:.0%}"
        new = np.where(layer_mask(w, float(level)), w, np.float32(0))
    elif technique == "cluster":
        new = kmeans_1d(w, int(level)).weights()
    else:  # int8 weights on a coarser grid
        new = _coarse_grid(w, int(level), layer.out_axis)
    return with_weights(fm, {layer.weight: new.astype(np.float32)})


def measure_sensitivity(fm: FloatModel, layers: list[Layer], levels: dict[str, tuple[float, ...]],
                        scorer: Scorer, *, deadline: float,
                        progress: Callable[[str, int, int], None] | None = None) -> Sensitivity:
    """Each level of each technique in ``levels`` on each layer alone, largest layers
    first, until ``deadline`` (``time.perf_counter()``) would be passed."""
    start = time.perf_counter()
    table = Sensitivity(levels=levels, samples=scorer.data.num_samples)
    float_macs = total_macs(fm) if "structured" in levels else 0.0
    total = len(layers) * sum(len(v) for v in levels.values())
    per_eval = scorer.pass_seconds  # updated from what each evaluation takes
    done = 0
    for layer in layers:
        table.losses[layer.name] = {t: [None] * len(v) for t, v in levels.items()}
        for tech, values in levels.items():
            losses = table.losses[layer.name][tech]
            for i, level in enumerate(values):
                done += 1
                if table.complete and time.perf_counter() + 1.5 * per_eval > deadline:
                    table.complete = False
                if not table.complete:
                    table.reasons.setdefault(f"{layer.name}/{tech}", "time budget")
                    break
                if f"{layer.name}/{tech}" in table.collapsed:
                    losses[i] = losses[i - 1]  # at least as bad: not run
                    continue
                t = time.perf_counter()
                try:
                    model = variant(fm, layer, tech, level)
                    m = scorer.measure(model) if not isinstance(model, str) else None
                except LowbitError as exc:
                    model, m = str(exc), None
                if isinstance(model, str) or m is None:
                    table.reasons[f"{layer.name}/{tech}"] = str(model)
                    break
                losses[i] = scorer.ranking_loss(m)
                if scorer.collapsed(m):
                    table.collapsed[f"{layer.name}/{tech}"] = float(level)
                if tech == "structured":
                    table.macs_saved.setdefault(layer.name, [None] * len(values))[i] = \
                        float_macs - total_macs(model)
                table.evaluations += 1
                per_eval = 0.7 * per_eval + 0.3 * (time.perf_counter() - t)
                if progress is not None:
                    progress("measuring layer sensitivity", done, total)
    table.seconds = time.perf_counter() - start
    return table
