"""Comparing edits at matched damage, for rows (b) and (g).

A method that removes more refusal at more damage has not shown that it removes refusal better, and
each method's natural strength lands at a different KL (DIM at a relaxed layer had 0.47 where the
searched edit had 0.026). So every compared method is swept in strength on validation prompts only,
with the construction the edit search uses for its warm starts: a uniform weight s on every attention
and MLP write (``EditSpace.full_ablation_params(layer, s)`` → decode → ``build_edit``; for a SOM
subset the same kernel with the subset as the source; for the searched edit its own per-layer weights
times s). The grid is refined toward the target validation KL (the DIM selection filter's bound, which
is also the edit search's pick bound) by interpolating KL linearly in s inside the bracketing pair
(``next_strength``), and the **matched strength** is the evaluated one whose validation KL (next-token
KL on the harmless validation prompts) is closest to the target, the lower KL on a tie. Only there is each method measured on held-out prompts (refusal
rate by generation, KL on harmless_test, both with 95% intervals), and the refusal rates are compared
by ``lower_is_better`` (inconclusive exactly when the two refusal intervals overlap). The row says so
when the matching did not hold: when a method's validation KL never crosses the target within the grid,
when the matched strength is still more than MATCH_TOLERANCE off it, or when the held-out KL intervals of
the compared methods do not overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits import Edit, LayerwiseAblation
from refusal_atlas.evaluation.verdicts import ClaimVerdict, lower_is_better
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, say

RULE = ("each method's strength is swept on validation prompts (uniform weight s on every write, as the edit "
        "search's warm starts; grid, then steps interpolated toward the target); the strength whose validation KL is "
        "closest to the target KL (ties: lower KL) is the matched one; held-out refusal and KL are measured "
        "there only")


# --- the rule (pure) ----------------------------------------------------------------------------------
def choose_matched(points: Sequence[Mapping[str, Any]], target: float) -> Mapping[str, Any]:
    """The point (``strength``, ``val_kl``) whose validation KL is closest to ``target``; ties: lower KL."""
    if not points:
        raise ConfigError("no strengths were evaluated")
    # distances equal to 1e-9 are a tie (float noise must not decide between two equally close strengths)
    return min(points, key=lambda p: (round(abs(p["val_kl"] - target), 9), p["val_kl"], p["strength"]))


def next_strength(points: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Where the validation KL should reach ``target``: linear interpolation of KL against strength inside the
    first (lowest-strength, so least damaging) neighbouring pair whose KLs bracket it (one at or below, one
    above), kept at least a quarter of the pair's gap from either end so that every step shrinks the bracket
    by at least a quarter even when KL is far from linear in s. None when no pair brackets the target (it lies
    outside the swept range)."""
    ordered = sorted(points, key=lambda p: p["strength"])
    for lo, hi in zip(ordered, ordered[1:]):
        if (lo["val_kl"] - target) * (hi["val_kl"] - target) <= 0 and lo["val_kl"] != hi["val_kl"]:
            gap = hi["strength"] - lo["strength"]
            frac = (target - lo["val_kl"]) / (hi["val_kl"] - lo["val_kl"])
            return lo["strength"] + gap * min(0.75, max(0.25, frac))
    return None


def reached(points: Sequence[Mapping[str, Any]], target: float) -> bool:
    """Whether the swept validation KLs reach the target from both sides (otherwise the match is one-sided)."""
    kls = [p["val_kl"] for p in points]
    return bool(kls) and min(kls) <= target <= max(kls)


def matched_summary(method: str, points: Sequence[Mapping[str, Any]], target: float, heldout_refusal: Mapping,
                    heldout_kl: Mapping, **extra: Any) -> dict[str, Any]:
    """One method at its matched strength: the sweep, the choice and the held-out numbers measured there."""
    chosen = choose_matched(points, target)
    return {"method": method, "target_kl": target, "strength": chosen["strength"], "val_kl": chosen["val_kl"],
            "reached_target": reached(points, target), "heldout_refusal": dict(heldout_refusal),
            "heldout_kl": dict(heldout_kl), "sweep": [dict(p) for p in sorted(points, key=lambda p: p["strength"])],
            **extra}


MATCH_TOLERANCE = 0.25  # a matched validation KL further than this fraction from the target is said in the row


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def matching_caveats(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where the matched comparison is not matched: a target a method's sweep never crossed, a crossed target
    the refining steps did not get within MATCH_TOLERANCE of, or held-out KL intervals that do not overlap."""
    out = []
    for s in summaries:
        off = abs(s["val_kl"] - s["target_kl"]) / s["target_kl"] if s["target_kl"] > 0 else 0.0
        if s["reached_target"] and off > MATCH_TOLERANCE:
            out.append(f"{s['method']}'s matched strength {s['strength']:.3g} has validation KL {s['val_kl']:.3g}, "
                       f"{off:.0%} from the target {s['target_kl']:g} (more refining steps would match it closer)")
        if not s["reached_target"]:
            kls = [p["val_kl"] for p in s["sweep"]]
            side = "below" if max(kls) < s["target_kl"] else "above"
            out.append(f"{s['method']} stays {side} the target validation KL {s['target_kl']:g} at every swept "
                       f"strength ({min(kls):.3g}–{max(kls):.3g}); it is compared at strength {s['strength']:g}")
    for i, a in enumerate(summaries):
        for b in summaries[i + 1:]:
            if not _overlap(a["heldout_kl"]["ci95"], b["heldout_kl"]["ci95"]):
                out.append(f"held-out KL not matched: {a['method']} {a['heldout_kl']['mean']:.3g} "
                           f"{a['heldout_kl']['ci95']} vs {b['method']} {b['heldout_kl']['mean']:.3g} "
                           f"{b['heldout_kl']['ci95']} (the validation match did not carry over)")
    return out


def compare_matched(a: Mapping[str, Any], b: Mapping[str, Any], what: str) -> ClaimVerdict:
    """Claim: A refuses less than B on held-out prompts, each at its matched strength."""
    v = lower_is_better(a["heldout_refusal"], b["heldout_refusal"], what)
    detail = (f"{v.detail} (at matched validation KL: A s={a['strength']:.3g} KL {a['val_kl']:.3g}, "
              f"B s={b['strength']:.3g} KL {b['val_kl']:.3g}; held-out KL A {a['heldout_kl']['mean']:.3g}, "
              f"B {b['heldout_kl']['mean']:.3g})")
    return ClaimVerdict(v.verdict, v.rule, detail)


# --- the edits ----------------------------------------------------------------------------------------
class StrengthFamily:
    """Uniform-strength edits of one run, built as the edit search builds its warm starts."""

    def __init__(self, ctx: ReproduceContext, sets: Sequence[str] = ()):
        from refusal_atlas.search.edit_space import EditSpace
        from refusal_atlas.search.sources import EditContext

        self.ectx = EditContext.from_run(ctx.ws.run.path, list(sets))
        # every layer may carry the direction: the DIM layer need not lie in the search's index range
        self.space = EditSpace(self.ectx.n_layers, tuple((n, tuple(d.ids)) for n, d in sorted(self.ectx.sets.items())),
                               min([7, *[len(d) for d in self.ectx.sets.values()]]), index_range=(0.0, 1.0))
        self.layer = ctx.dim.layer

    def dim(self, strength: float) -> Edit:
        from refusal_atlas.search.edit_space import build_edit

        choice = self.space.decode(self.space.full_ablation_params(self.layer, strength))
        return build_edit(choice, self.ectx, name=f"uniform_dim{self.layer}_s{strength:.4g}")

    def subset(self, name: str, ids: Sequence[int], mode: str, strength: float) -> Edit:
        from refusal_atlas.search.edit_space import build_edit

        params = dict(self.space.full_ablation_params(self.layer, strength))
        params.update({"source": f"set:{name}", "mode": mode})
        params.update({f"{name}_use_{i}": (1.0 if i in ids else 0.0) for i in dict(self.space.sets)[name]})
        choice = self.space.decode(params)
        if choice["ids"] != [i for i in dict(self.space.sets)[name] if i in ids]:
            raise ConfigError(f"subset {list(ids)} of {name!r} does not decode to itself: {choice['ids']}")
        return build_edit(choice, self.ectx, name=f"uniform_{name}{'-'.join(map(str, ids))}_{mode[:3]}_s{strength:.4g}")


def scaled(edit: Edit, strength: float) -> LayerwiseAblation:
    """A per-layer edit with every strength (attn, MLP, embedding, router) multiplied by ``strength``."""
    if not isinstance(edit, LayerwiseAblation):
        raise ConfigError(f"only per-layer edits can be scaled, not {edit.edit_type}")
    return edit.scaled(strength)


# --- measuring ----------------------------------------------------------------------------------------
def sweep(ctx: ReproduceContext, make: Callable[[float], Edit], target: float, what: str) -> list[dict[str, Any]]:
    """Validation KL (and validation refusal score, on the grid) per strength, then ``strength_refine``
    interpolated steps toward ``target`` (each one forward pass over the harmless validation prompts)."""
    b, sets = ctx.budget, ctx.sets

    def point(s: float, score: bool) -> dict[str, Any]:
        edit = make(s)
        kl = ctx.kl(edit, prompts=sets.harmless_val, dataset=b.harmless_val)
        p = {"strength": s, "val_kl": kl["mean"], "val_kl_ci95": kl["ci95"]}
        if score:
            p["val_score"] = ctx.score_record(edit, prompts=sets.harmful_val, dataset=b.harmful_val)["mean"]
        return p

    points = [point(s, True) for s in b.strength_grid]
    for _ in range(b.strength_refine):
        s = next_strength(points, target)
        if s is None or any(abs(p["strength"] - s) < 1e-9 for p in points):
            break
        points.append(point(s, False))
    chosen = choose_matched(points, target)
    say(f"{what}: matched strength {chosen['strength']:.3g} (validation KL {chosen['val_kl']:.3g}, target {target:g})")
    return sorted(points, key=lambda p: p["strength"])


def measure_matched(ctx: ReproduceContext, method: str, make: Callable[[float], Edit]) -> dict[str, Any]:
    """Sweep ``make`` on validation, then held-out refusal (generation) and KL at the matched strength."""
    target = ctx.ws.settings.selection.kl_threshold
    points = sweep(ctx, make, target, method)
    edit = make(choose_matched(points, target)["strength"])
    return matched_summary(method, points, target, ctx.refusal_rate(edit), ctx.kl(edit), label=edit.label,
                           heldout_score=ctx.score_record(edit))
