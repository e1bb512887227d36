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


def mean_record(values, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean with a percentile-bootstrap 95% interval (KL is skewed, so no normal approximation)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"n": int(x.size), "mean": float(x.mean()), "ci95": [round(float(lo), 6), round(float(hi), 6)]}
