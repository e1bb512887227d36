"""Verdicts on a paper's claims, by rules stated next to each verdict.

A reproduced claim is only as good as the rule that judges it, so the rule is part of the result:
every verdict carries the rule's text, and the rules are deliberately conservative — two 95%
intervals that overlap never support a claim that one method beats another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Verdict = Literal["supported", "not supported", "inconclusive"]

RATE_RULE = ("95% intervals: A's upper bound below B's lower bound → supported; A's lower bound above B's "
             "upper bound → not supported; overlapping intervals → inconclusive")
TOLERANCE_RULE = "supported when the measured value is at most the tolerance, otherwise not supported"
SEPARATION_RULE = ("supported when every A value is better (lower) than every B value; not supported when the "
                   "medians are in the wrong order; otherwise inconclusive")


@dataclass(frozen=True)
class ClaimVerdict:
    verdict: Verdict
    rule: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def _interval(record: Mapping) -> tuple[float, float]:
    lo, hi = record["ci95"]
    if not lo <= hi:
        raise ValueError(f"interval {record['ci95']} is not ordered")
    return float(lo), float(hi)


def lower_is_better(a: Mapping, b: Mapping, what: str = "refusal") -> ClaimVerdict:
    """Claim: A has a lower ``what`` than B. Records hold ``rate`` (or ``mean``) and ``ci95``."""
    (alo, ahi), (blo, bhi) = _interval(a), _interval(b)
    va, vb = a.get("rate", a.get("mean")), b.get("rate", b.get("mean"))
    detail = f"{what} A {va:.3f} [{alo:.3f}, {ahi:.3f}] vs B {vb:.3f} [{blo:.3f}, {bhi:.3f}]"
    if ahi < blo:
        return ClaimVerdict("supported", RATE_RULE, detail)
    if alo > bhi:
        return ClaimVerdict("not supported", RATE_RULE, detail)
    return ClaimVerdict("inconclusive", RATE_RULE, detail)


def within_tolerance(value: float, tolerance: float, what: str = "relative error") -> ClaimVerdict:
    """Claim: ``value`` (an error, ≥ 0) is at most ``tolerance``."""
    if value != value:  # NaN: nothing was measured
        return ClaimVerdict("inconclusive", TOLERANCE_RULE, f"{what} is NaN")
    verdict: Verdict = "supported" if value <= tolerance else "not supported"
    return ClaimVerdict(verdict, TOLERANCE_RULE, f"{what} {value:.3g} vs tolerance {tolerance:.3g}")


def separated(a: Sequence[float], b: Sequence[float], what: str = "refusal score") -> ClaimVerdict:
    """Claim: values A (e.g. cone samples) are lower than values B (e.g. random directions)."""
    if not a or not b:
        return ClaimVerdict("inconclusive", SEPARATION_RULE, "no values")
    sa, sb = sorted(a), sorted(b)
    med_a, med_b = sa[len(sa) // 2], sb[len(sb) // 2]
    detail = (f"{what}: A {sa[0]:.3f}…{sa[-1]:.3f} (n {len(sa)}), B {sb[0]:.3f}…{sb[-1]:.3f} (n {len(sb)})")
    if sa[-1] < sb[0]:
        return ClaimVerdict("supported", SEPARATION_RULE, detail)
    if med_a >= med_b:
        return ClaimVerdict("not supported", SEPARATION_RULE, detail)
    return ClaimVerdict("inconclusive", SEPARATION_RULE, detail)


CORRELATION_RULE = ("Pearson r with a Fisher-z 95% interval (needs n >= 4 points): interval above 0 → supported; "
                    "below 0 → not supported; containing 0 (or n < 4) → inconclusive")
ALL_OF_RULE = "every part supported → supported; any part not supported → not supported; otherwise inconclusive"


def pearson_interval(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson r of paired values with a Fisher-z 95% interval (None when n < 4 or a series is constant)."""
    import math

    n = len(x)
    if n != len(y):
        raise ValueError("paired series of different lengths")
    if n < 2:
        return {"r": None, "ci95": None, "n": n}
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return {"r": None, "ci95": None, "n": n}
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)
    r = max(-1.0, min(1.0, r))
    if n < 4:
        return {"r": r, "ci95": None, "n": n}
    z, half = math.atanh(max(-0.999999, min(0.999999, r))), 1.959964 / math.sqrt(n - 3)
    return {"r": r, "ci95": [math.tanh(z - half), math.tanh(z + half)], "n": n}


def positively_correlated(x: Sequence[float], y: Sequence[float], what: str = "r") -> ClaimVerdict:
    """Claim: x and y rise together (e.g. centroid distance and refusal score as directions are ablated)."""
    stats = pearson_interval(x, y)
    if stats["r"] is None or stats["ci95"] is None:
        r = "undefined" if stats["r"] is None else f"{stats['r']:.3f}"
        return ClaimVerdict("inconclusive", CORRELATION_RULE, f"{what} {r} (n {stats['n']}, no interval)")
    lo, hi = stats["ci95"]
    detail = f"{what} {stats['r']:.3f} [{lo:.3f}, {hi:.3f}] (n {stats['n']})"
    if lo > 0:
        return ClaimVerdict("supported", CORRELATION_RULE, detail)
    if hi < 0:
        return ClaimVerdict("not supported", CORRELATION_RULE, detail)
    return ClaimVerdict("inconclusive", CORRELATION_RULE, detail)


def all_of(parts: Sequence[ClaimVerdict]) -> ClaimVerdict:
    """A claim made of parts (e.g. 'at every cone dimension'): the weakest part decides."""
    if not parts:
        return ClaimVerdict("inconclusive", ALL_OF_RULE, "no parts")
    labels = [p.verdict for p in parts]
    verdict: Verdict = ("not supported" if "not supported" in labels else
                        "supported" if all(v == "supported" for v in labels) else "inconclusive")
    return ClaimVerdict(verdict, ALL_OF_RULE, "; ".join(p.detail for p in parts))
