"""Confidence intervals for rates: every reported rate carries n and a 95% interval."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval; well-behaved at 0 and n (unlike the normal approximation)."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_record(successes: int, n: int) -> dict:
    lo, hi = wilson_interval(successes, n)
    return {"n": n, "count": successes, "rate": successes / n, "ci95": [round(lo, 4), round(hi, 4)]}
