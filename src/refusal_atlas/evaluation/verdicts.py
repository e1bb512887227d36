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
