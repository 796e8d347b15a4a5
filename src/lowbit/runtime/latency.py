"""Latency measured side by side: models alternate, warmed up, median of many runs.

Ratios measured this way are what lowbit reports; absolute times vary
between runs and machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    batch: int
    threads: int
    iterations: int

    @property
    def throughput(self) -> float:
        """Samples per second at the p50 latency."""
        return self.batch / (self.p50_ms / 1000.0) if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "p50_ms": round(self.p50_ms, 4), "p90_ms": round(self.p90_ms, 4),
            "mean_ms": round(self.mean_ms, 4), "batch": self.batch, "threads": self.threads,
            "iterations": self.iterations, "throughput_per_s": round(self.throughput, 2),
        }


def measure_side_by_side(
    sessions: list[Any],
    feeds: list[dict[str, np.ndarray]],
    *,
    batch: int,
    threads: int,
    iterations: int = 50,
    warmup: int = 5,
    min_time_s: float = 0.0,
) -> list[LatencyStats]:
    """Run each session in turn (A, B, C, then B, C, A, ...) and return per-session stats.

    ``feeds[i]`` is the input of ``sessions[i]``. Keeps going past
    ``iterations`` until ``min_time_s`` has passed (for very fast models).
    """
    for _ in range(warmup):
        for sess, feed in zip(sessions, feeds):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    i = 0
    while i < iterations or (time.perf_counter() - start < min_time_s and i < 20 * iterations):
        # rotate the order (A B C, B C A, C A B, ...): every session runs in every position
        # and none runs twice in a row (reversing A B C / C B A ran both ends twice in a
        # row at the turns, which measured them 4-15% faster than identical models between)
        order = [(i + k) % len(sessions) for k in range(len(sessions))]
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
        i += 1
    stats = []
    for ts in times:
        arr = np.asarray(ts) * 1000.0
        stats.append(LatencyStats(
            p50_ms=float(np.median(arr)), p90_ms=float(np.percentile(arr, 90)),
            mean_ms=float(arr.mean()), batch=batch, threads=threads, iterations=len(ts),
        ))
    return stats
