"""Speed ratios as text that never hides a slowdown: 0.996 is "0.996x", not "1.00x"."""

from __future__ import annotations

import math


def speedup_text(ratio: float, *, say_slower: bool = False) -> str:
    """``ratio`` (float time / compressed time) with two decimals, or as many more (up to
    four) as it takes not to round a ratio other than 1 to "1.00"; a slowdown that four
    decimals still round to 1 is truncated ("0.9999x"). ``say_slower`` adds "(slower)"
    below 1.

    >>> speedup_text(1.234), speedup_text(0.996), speedup_text(0.996, say_slower=True)
    ('1.23x', '0.996x', '0.996x (slower)')
    """
    if not math.isfinite(ratio):
        return f"{ratio}x"
    text = f"{ratio:.2f}"
    if ratio != 1.0 and float(text) == 1.0:
        text = f"{ratio:.3f}"
        if float(text) == 1.0:
            text = f"{math.floor(ratio * 1e4) / 1e4:.4f}" if ratio < 1.0 else f"{ratio:.4f}"
    return text + "x" + (" (slower)" if say_slower and ratio < 1.0 else "")


def stored_ratio(ratio: float) -> float:
    """``ratio`` rounded to 4 decimals for a report, a slowdown never stored as 1.0."""
    if not math.isfinite(ratio):
        return ratio
    stored = round(ratio, 4)
    return 0.9999 if ratio < 1.0 <= stored else stored
