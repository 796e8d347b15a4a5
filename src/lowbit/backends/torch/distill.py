"""Knowledge-distillation losses (torch): the student's outputs against the teacher's.

- ``kl`` (Hinton et al. 2015): both softened by temperature T, KL(teacher || student)
  over the last axis, times T^2 so its gradients keep their size as T changes;
- ``mse``: mean squared difference of the raw outputs (logit matching, regression);
- ``cosine``: 1 - cosine similarity of each output row (embeddings; no labels needed).

    >>> import torch
    >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[2.0, 0.0]])
    >>> float(distill_loss(s, t, DistillSettings(loss="kl"), classify=True))
    0.0
"""

from __future__ import annotations

from typing import Any

from lowbit.config.training import DistillLoss, DistillSettings


def distill_loss(student: Any, teacher: Any, settings: DistillSettings, *, classify: bool) -> Any:
    """The teacher's loss on one run; ``classify``: the outputs are class scores (the
    ``auto`` loss is then ``kl``, else ``mse``)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    kind = settings.loss
    if kind is DistillLoss.AUTO:
        kind = DistillLoss.KL if classify else DistillLoss.MSE
    if kind is DistillLoss.KL:
        t = float(settings.temperature)
        log_student = F.log_softmax(student / t, dim=-1)
        log_teacher = F.log_softmax(teacher / t, dim=-1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1).mean()
        return kl * (t * t)
    if kind is DistillLoss.MSE:
        return F.mse_loss(student, teacher)
    s = student.reshape(-1, student.shape[-1]) if student.ndim > 1 else student[None]
    u = teacher.reshape(-1, teacher.shape[-1]) if teacher.ndim > 1 else teacher[None]
    return (1.0 - torch.nn.functional.cosine_similarity(s, u, dim=-1, eps=1e-8)).mean()


def feature_loss(student: list[Any], teacher: list[Any]) -> Any:
    """Mean over features of the squared difference relative to the teacher's mean
    square (so every layer counts alike, whatever its scale)."""
    total = 0.0
    for s, t in zip(student, teacher):
        t = t.reshape(s.shape)
        total = total + ((s.float() - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
    return total / max(1, len(student))


def capture(store: dict[str, Any], name: str, inner: Any = None) -> Any:
    """A module for the bridge's tensor hooks that records tensor ``name`` in ``store``
    (after ``inner``, e.g. QAT's fake quantization, when the tensor already has a hook)."""
    import torch

    class Capture(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            y = self.inner(x) if self.inner is not None else x
            store[name] = y
            return y

    return Capture()
