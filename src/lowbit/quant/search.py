"""Meet a quality target with the fewest layers kept in float.

Backend-neutral: the caller gives ``build(excluded_layer_names) -> candidate``
and ``score(candidate) -> float`` (higher is better: an output cosine, or minus
an accuracy drop). If the first candidate misses the target, each quantized
layer is measured alone (only that layer quantized: its *sensitivity*), the
layers are ordered from most to least sensitive, and the smallest number of
them is kept in float (binary search over that order) for which the whole
model meets the target. Every layer kept in float costs speed, so the search
keeps as few as it can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class SearchResult(Generic[T]):
    candidate: T
    score: float  # the quality of ``candidate``
    kept_float: list[str] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    met: bool = True


def meet_quality_target(build: Callable[[tuple[str, ...]], T], first: T,
                        layers: list[tuple[str, str]], score: Callable[[T], float],
                        target: float, *, metric: str = "cosine",
                        progress: Callable[[str, int, int], None] | None = None
                        ) -> SearchResult[T]:
    """``layers``: (name, op type) of the quantized layers of ``first``."""
    first_score = score(first)
    if first_score >= target:
        return SearchResult(first, first_score)
    key = f"{metric}_when_only_this_is_int8"
    names = [n for n, _ in layers]
    sensitivity = []
    for k, (name, op) in enumerate(layers):
        alone = score(build(tuple(n for n in names if n != name)))
        sensitivity.append({"name": name, "op_type": op, key: round(alone, 6)})
        if progress is not None:
            progress("measuring layer sensitivity", k + 1, len(layers))
    order = [s["name"] for s in sorted(sensitivity, key=lambda s: s[key])]
    lo, hi = 1, len(order)  # smallest k in [1, n] that meets the target
    best: tuple[int, T, float] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = build(tuple(order[:mid]))
        value = score(candidate)
        if value >= target:
            best, hi = (mid, candidate, value), mid - 1
        else:
            lo = mid + 1
    if best is None:  # even all weighted layers in float miss it: report, keep the first
        return SearchResult(first, first_score, [], sensitivity, met=False)
    k, candidate, value = best
    return SearchResult(candidate, value, order[:k], sensitivity)


def pick_fast_and_accurate(speeds: list[float], qualities: list[float], *,
                           tolerance: float = 0.05, min_gain: float = 3.0,
                           max_loss: float = 6.0, good_enough: float = 30.0) -> int:
    """Index of the candidate to keep: the fastest, unless one at most ``tolerance``
    slower is at least ``min_gain`` better in quality (e.g. dB of output SQNR): then the
    best-quality one of those. Only candidates within ``max_loss`` of the most accurate,
    or at least ``good_enough``, compete: speed never buys a model 4x noisier than
    another candidate when neither is accurate enough for the noise not to matter.
    Ties go to the earlier candidate."""
    floor = min(max(qualities) - max_loss, good_enough)
    eligible = [i for i in range(len(speeds)) if qualities[i] >= floor]
    fastest = max(eligible, key=lambda i: (speeds[i], -i))
    close = [i for i in eligible if speeds[i] >= (1.0 - tolerance) * speeds[fastest]]
    best = max(close, key=lambda i: (qualities[i], -i))
    return best if qualities[best] >= qualities[fastest] + min_gain else fastest
