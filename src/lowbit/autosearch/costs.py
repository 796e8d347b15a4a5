"""How long the next configuration will take, learned from the ones before.

A configuration costs a run's fixed work (load, split, encode), its training epochs
(each weight stage counts a quarter epoch more, for its own setup), its quantization
stage, and measuring the result. Each part is learned from the configurations run so
far, erring long (a larger observation counts at once, a smaller one only gradually): a
step that would overrun the budget is not started. Before any run the parts are guessed
from the float model's speed on the validation data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lowbit.config import StageConfig
from lowbit.config.order import QUANTIZE_CONFIGS

SAFETY = 1.2
QUANTIZE_KINDS = tuple(c.kind for c in QUANTIZE_CONFIGS)
TRAIN_OVER_INFERENCE = 10.0  # a training epoch vs one inference pass over the same samples
SECONDS_PER_BATCH = 0.004  # the training loop's own cost per batch (32 samples)


def _split(stages: Sequence[StageConfig]) -> tuple[float, int, bool]:
    """(training epochs of the weight stages, counting a quarter per stage; quantization
    epochs; whether it quantizes)."""
    epochs, q_epochs, quantizes = 0.0, 0, False
    for s in stages:
        if s.kind in QUANTIZE_KINDS:
            quantizes, q_epochs = True, int(getattr(s, "epochs", 0))
        else:
            epochs += 0.25 + int(getattr(s, "epochs", 0))
    return epochs, q_epochs, quantizes


def _learned(old: float | None, seen: float) -> float:
    """A larger observation counts at once; a smaller one moves the estimate down slowly."""
    return seen if old is None else max(seen, 0.6 * old + 0.4 * seen)


class Costs:
    def __init__(self, d: Any) -> None:
        val = d.val
        per_sample = max(val.run_seconds, 1e-6) / max(1, val.data.num_samples)
        n = d.train.num_samples
        self.epoch = TRAIN_OVER_INFERENCE * per_sample * n + SECONDS_PER_BATCH * n / 32
        self.overhead = 0.5 + 3.0 * val.session_seconds
        self.quant = 1.5 + 30.0 * per_sample * min(256, n) + 3.0 * val.session_seconds
        self.measure = 2.0 * val.pass_seconds + (2.0 if d.feed is not None else 0.0)
        self.learned: set[str] = set()

    def estimate(self, stages: Sequence[StageConfig]) -> float:
        epochs, q_epochs, quantizes = _split(stages)
        total = self.overhead + epochs * self.epoch + self.measure
        if quantizes:
            total += self.quant + q_epochs * self.epoch
        return SAFETY * total

    def learn(self, stages: Sequence[StageConfig], stage_seconds: dict[str, Any],
              run_seconds: float, measure_seconds: float) -> None:
        """Update the parts from one configuration: its run's wall time, the seconds its
        report gives the quantization stage, and the time measuring it took."""
        epochs, q_epochs, quantizes = _split(stages)
        quant_s = float(next((stage_seconds[k] for k in QUANTIZE_KINDS if k in stage_seconds),
                             0.0))
        rest = max(0.0, run_seconds - quant_s)
        if epochs < 1.0 or "overhead" not in self.learned:  # (mostly the run's own work)
            self.overhead = _learned(self.overhead if "overhead" in self.learned else None,
                                     rest if epochs < 1.0 else rest / (1.0 + epochs))
            self.learned.add("overhead")
        if epochs >= 1.0:
            per_epoch = max(0.0, rest - self.overhead) / epochs
            self.epoch = _learned(self.epoch if "epoch" in self.learned else None, per_epoch)
            self.learned.add("epoch")
        if quantizes and quant_s:
            q = max(0.0, quant_s - q_epochs * self.epoch)
            self.quant = _learned(self.quant if "quant" in self.learned else None, q)
            self.learned.add("quant")
        if measure_seconds:
            self.measure = _learned(self.measure if "measure" in self.learned else None,
                                    measure_seconds)
            self.learned.add("measure")
