"""What a search hands back: the best valid model, every configuration it tried (its
trajectory), how far it got, and a plain-language summary."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.autosearch.space import SearchOptions
from lowbit.pipeline import CompressedModel


@dataclass
class Trial:
    """One configuration tried: its stages, objective value (``size_bytes`` of the .lbz,
    or ``latency_ratio``: its latency over the float model's, lower is better), quality
    on the validation data, whether it meets the target, and the seconds it took."""

    index: int
    label: str
    stages: list[dict[str, Any]]
    size_bytes: int | None = None
    latency_ratio: float | None = None
    drop_points: float | None = None
    cosine: float | None = None
    valid: bool = False
    seconds: float = 0.0
    path_index: int | None = None  # its place on the path of ever stronger plans
    predicted_loss: float | None = None
    best_so_far: bool = False
    note: str = ""

    def objective_value(self, objective: str) -> float | None:
        return self.latency_ratio if objective == "latency" else self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("drop_points", "predicted_loss", "latency_ratio"):
            if out[key] is not None:
                out[key] = round(out[key], 4)
        if out["cosine"] is not None:
            out["cosine"] = round(out["cosine"], 6)
        out["seconds"] = round(out["seconds"], 2)
        return out


@dataclass
class SearchOutcome:
    """``best``: the best valid model found (its report has a "search" section);
    ``trajectory``: every configuration tried, in order (#0 is the float model, the
    valid start); ``stopped``: why the search ended; ``summary``: one paragraph."""

    best: CompressedModel
    trajectory: list[Trial]
    stopped: str
    summary: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> dict[str, Any]:
        return self.best.report

    @property
    def best_trial(self) -> Trial:
        return next(t for t in self.trajectory if t.index == self.report["search"]["best"]["index"])

    def save(self, path: str | os.PathLike[str], *, report: bool = True) -> Path:
        """Save the best model (``.lbz`` or ``.onnx``, and its report beside it)."""
        return self.best.save(path, report=report)


def summary_text(options: SearchOptions, trials: list[Trial], best: Trial, stopped: str,
                 seconds: float, float_bytes: int, validation_samples: int,
                 latency_setting: str) -> str:
    """The few sentences a person reads at the end of a search."""
    n = len(trials) - 1  # (#0, the float model, was not tried: it is the reference)
    head = (f"Tried {n} configuration{'s' if n != 1 else ''} in {seconds:.0f} s of a "
            f"{options.budget_s:.0f} s budget; {stopped}.")
    if best.index == 0:
        return (f"{head} Nothing tried beat the float model within the target "
                f"({_target_text(options)}): the result is the float model, unchanged.")
    if options.objective == "latency":
        gain = (f"{1.0 / best.latency_ratio:.2f}x the float model's speed ({latency_setting})"
                if best.latency_ratio else "latency not measured")
    else:
        ratio = float_bytes / max(1, best.size_bytes or float_bytes)
        gain = (f"{ratio:.1f}x smaller than the float model ({float_bytes:,} -> "
                f"{best.size_bytes:,} bytes as .lbz)")
    if options.max_drop is not None:
        quality = f"accuracy drop {best.drop_points:.2f} points (limit {options.max_drop:g})"
    else:
        quality = f"output cosine {best.cosine:.5f} (at least {options.min_cosine:g})"
    return (f"{head} Best: #{best.index} {best.label}: {gain}; {quality} on "
            f"{validation_samples} validation samples.")


def _target_text(options: SearchOptions) -> str:
    if options.max_drop is not None:
        return f"accuracy drop at most {options.max_drop:g} points"
    return f"output cosine at least {options.min_cosine:g}"


def search_section(options: SearchOptions, trials: list[Trial], best: Trial, *, stopped: str,
                   seconds: float, float_bytes: int, validation: dict[str, Any],
                   details: dict[str, Any]) -> dict[str, Any]:
    """The report's "search" section."""
    return {
        "target": options.target_dict(), "objective": options.objective,
        "techniques": list(options.techniques), "epochs": options.epochs,
        "budget_s": options.budget_s, "seconds": round(seconds, 2), "stopped": stopped,
        "configurations_tried": len(trials) - 1, "float_lbz_bytes": float_bytes,
        "validation": validation,
        "best": {"index": best.index, "label": best.label, "size_bytes": best.size_bytes,
                 "size_ratio": round(float_bytes / max(1, best.size_bytes or float_bytes), 3),
                 "latency_ratio": best.latency_ratio, "drop_points": best.drop_points,
                 "cosine": best.cosine},
        **details,
        "trajectory": [t.to_dict() for t in trials],
    }
