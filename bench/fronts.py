"""Fronts, dominance with intervals and wall budgets for bench/vs_heretic.py (pure; unit-tested).

A point is one scored model: ``{"name", "refusals" (count), "n", "kl"}`` and optionally ``"kl_ci"`` ([lo, hi],
a bootstrap interval of the mean KL; heretic's evaluator prints a mean only). Lower is better on both axes.

Dominance is judged two ways, and both are reported:
- by point estimates: ours o dominates heretic's h when o's refusal rate <= h's and o's KL <= h's, one of the
  two strictly lower;
- with intervals: o dominates h by the point estimates *and* on a coordinate where o is lower the two 95%
  intervals do not overlap (refusal: Wilson intervals of the counts; KL: the bootstrap intervals, where both
  have one). Overlapping intervals on both coordinates mean the data cannot tell the two apart.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from refusal_atlas.evaluation.stats import wilson_interval


def wilson(count: int, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of count / n; a count outside 0..n is an error, not an interval."""
    if n <= 0 or not 0 <= count <= n:
        raise ValueError(f"need 0 <= count <= n and n > 0, got {count}/{n}")
    return wilson_interval(count, n)


def rate(p: dict) -> float:
    return p["refusals"] / p["n"]


def dominates(o: dict, h: dict) -> bool:
    """o at least as good on both axes (refusal rate, KL) and strictly better on one: point estimates."""
    ro, rh = rate(o), rate(h)
    return ro <= rh and o["kl"] <= h["kl"] and (ro < rh or o["kl"] < h["kl"])


def separated(o: dict, h: dict) -> bool:
    """o dominates h by the point estimates, and on a coordinate where o is lower the 95% intervals part."""
    if not dominates(o, h):
        return False
    if rate(o) < rate(h) and wilson(o["refusals"], o["n"])[1] < wilson(h["refusals"], h["n"])[0]:
        return True
    return bool(o["kl"] < h["kl"] and o.get("kl_ci") and h.get("kl_ci") and o["kl_ci"][1] < h["kl_ci"][0])


def cover(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Per point of ``theirs``: which of ``ours`` dominate it by point estimates, and which with intervals apart."""
    return [{"point": h["name"], "dominated_by": [o["name"] for o in ours if dominates(o, h)],
             "separated_by": [o["name"] for o in ours if separated(o, h)]} for h in theirs]


def verdict(ours: list[dict], theirs: list[dict]) -> dict:
    """Both directions of :func:`cover`: how many of heretic's points ours dominates and vice versa."""
    fwd, back = cover(ours, theirs), cover(theirs, ours)
    return {"ours_over_heretic": fwd, "heretic_over_ours": back,
            "n_heretic": len(theirs), "n_ours": len(ours),
            "heretic_dominated": sum(bool(c["dominated_by"]) for c in fwd),
            "heretic_dominated_apart": sum(bool(c["separated_by"]) for c in fwd),
            "ours_dominated": sum(bool(c["dominated_by"]) for c in back),
            "ours_dominated_apart": sum(bool(c["separated_by"]) for c in back)}


def pareto(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """heretic's front rule: sort by (refusals, KL) and keep each point whose KL is below all before it."""
    front, best = [], float("inf")
    for r, d in sorted(points):
        if d < best:
            front.append((r, d))
            best = d
    return front


def nondominated(points: list[dict]) -> list[dict]:
    """The points no other point dominates (by point estimates), sorted by KL."""
    return sorted((p for p in points if not any(dominates(q, p) for q in points)), key=lambda p: (p["kl"], rate(p)))


def matched(front: list[dict], kls: list[float]) -> list[dict]:
    """The points of ``front`` that face ``kls`` (another tool's points' KLs): for each KL, the point with the
    largest KL not above it, which on a front is the lowest refusal at no more damage, so the one point that
    could dominate the other's. Sorted by KL, each once; a KL below every point of ``front`` matches none.

    Why: scoring every front point on held-out prompts can cost more than the machine has; this picks, from
    validation numbers only (never held-out ones), the points the dominance question is about."""
    chosen: dict[int, dict] = {}
    for kl in kls:
        below = [p for p in front if p["kl"] <= kl]
        if below:
            best = max(below, key=lambda p: (p["kl"], -p["refusal"]))
            chosen.setdefault(best["number"], best)
    return sorted(chosen.values(), key=lambda p: (p["kl"], p["refusal"]))


# --- wall budgets -----------------------------------------------------------------------------------------
def search_seconds(heretic_wall_s: float, prep_s: float, fraction: float) -> float:
    """Seconds our search may run at ``fraction`` of heretic's wall time: fraction × heretic's set-up + search,
    less our extract + select (both tools' set-up counts). ValueError when nothing is left."""
    if heretic_wall_s <= 0 or fraction <= 0:
        raise ValueError(f"heretic's wall time and the fraction must be > 0, got {heretic_wall_s}, {fraction}")
    left = fraction * heretic_wall_s - prep_s
    if left <= 0:
        raise ValueError(f"{fraction:.3g} × heretic's {heretic_wall_s:.0f} s leaves no time after our extract + select "
                         f"({prep_s:.0f} s)")
    return left


def front_at(trials: list[dict], launch: datetime, seconds: float, max_kl: float | None = None) -> list[dict]:
    """Our search's front as it stood ``seconds`` after the search process was launched: the non-dominated
    completed trials (validation refusal number, KL) that had *ended* by then (and, under a KL cap, are within
    it). A trial still running at the cut-off does not count, as under a hard deadline.

    Reading a shorter budget off a longer search is honest here: the seeded sampler's proposals depend only
    on the trials before them, never on the budget, so a search stopped at the cut-off would have run the
    same trials."""
    cut = launch + timedelta(seconds=seconds)
    done = [t for t in trials if t.get("state") == "COMPLETE" and t.get("end") and "refusal" in t
            and datetime.fromisoformat(t["end"]) <= cut and (max_kl is None or t["kl"] <= max_kl)]
    front = [t for t in done if not any(u["refusal"] <= t["refusal"] and u["kl"] <= t["kl"]
                                        and (u["refusal"], u["kl"]) != (t["refusal"], t["kl"]) for u in done)]
    unique: dict[tuple[float, float], dict] = {}
    for t in sorted(front, key=lambda t: t["number"]):  # equal values: the first trial that reached them
        unique.setdefault((t["refusal"], t["kl"]), t)
    return sorted(unique.values(), key=lambda t: (t["kl"], t["refusal"]))


def trials_by(trials: list[dict], launch: datetime, seconds: float) -> int:
    """How many trials (complete or pruned) had ended ``seconds`` after launch."""
    cut = launch + timedelta(seconds=seconds)
    return sum(1 for t in trials if t.get("end") and t.get("state") in ("COMPLETE", "PRUNED")
               and datetime.fromisoformat(t["end"]) <= cut)
