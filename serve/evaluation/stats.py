"""Small statistics for reports: Wilson score intervals and latency percentiles."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval for a proportion; None when there is nothing to estimate.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0% and 100%,
    which is where ASR often lies."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0% and 100% the bound is exactly 0 or 1; rounding would otherwise leave it a hair inside,
    # and a value outside its own interval breaks error bars.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return min(lo, p), max(hi, p)


def rate(successes: int, n: int) -> dict:
    """A proportion with its count, denominator and Wilson interval, as the reports store it."""
    ci = wilson(successes, n)
    return {"k": int(successes), "n": int(n), "rate": None if n == 0 else successes / n,
            "ci95": None if ci is None else [ci[0], ci[1]]}


def percentiles(values_s: list[float], qs=(50, 95, 99)) -> dict:
    """Latency percentiles in milliseconds (keys p50, p95, p99); None without samples."""
    if not values_s:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}
