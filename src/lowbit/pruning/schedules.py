"""Sparsity schedules for gradual pruning during fine-tuning.

``polynomial_decay_schedule`` follows the form popularised by Zhu & Gupta
(2017) and the Keras model-optimization toolkit: sparsity rises from
``initial`` at ``begin_step`` to ``final`` at ``end_step`` as
``final + (initial - final) * (1 - progress) ** power``; masks are updated
every ``frequency`` steps in between and stay fixed afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import ValidationError
from lowbit.pruning.magnitude import check_sparsity


@dataclass(frozen=True)
class ConstantSparsity:
    """Prune to ``sparsity`` once at ``begin_step`` (then hold)."""

    sparsity: float
    begin_step: int = 0
    frequency: int = 1

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)

    def __call__(self, step: int) -> float | None:
        """The target sparsity to apply at ``step``, or None if masks do not change."""
        return self.sparsity if step == self.begin_step else None


@dataclass(frozen=True)
class PolynomialDecaySparsity:
    initial: float
    final: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 10

    def __post_init__(self) -> None:
        check_sparsity(self.initial, "initial_sparsity")
        check_sparsity(self.final, "final_sparsity")
        if self.final < self.initial:
            raise ValidationError(
                f"schedule: final sparsity {self.final} is below initial {self.initial} "
                "(masks only grow)")
        if self.end_step <= self.begin_step:
            raise ValidationError(
                f"schedule: end_step ({self.end_step}) must be after begin_step ({self.begin_step})")
        if self.frequency < 1:
            raise ValidationError(f"schedule: frequency {self.frequency} must be >= 1")

    def sparsity_at(self, step: int) -> float:
        if step <= self.begin_step:
            return self.initial
        if step >= self.end_step:
            return self.final
        progress = (step - self.begin_step) / (self.end_step - self.begin_step)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** self.power

    def __call__(self, step: int) -> float | None:
        if step < self.begin_step or step > self.end_step:
            return None
        if (step - self.begin_step) % self.frequency and step != self.end_step:
            return None
        return self.sparsity_at(step)


def polynomial_decay_schedule(initial: float, final: float, begin_step: int, end_step: int,
                              *, power: float = 3.0, frequency: int = 10) -> PolynomialDecaySparsity:
    return PolynomialDecaySparsity(initial, final, begin_step, end_step, power, frequency)
