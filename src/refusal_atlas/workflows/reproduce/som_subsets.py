"""Claim (b): the best SOM-k subset, chosen on validation prompts, beats DIM on held-out refusal at the
same damage (both at their matched-KL strengths: matched_kl.py).
"""

from __future__ import annotations

from typing import Any

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.som import SomDirections
from refusal_atlas.edits import NoEdit
from refusal_atlas.search.subsets import SubsetSpace, run_trials, subset_identity, subset_settings
from refusal_atlas.search.study import completed, open_study, summarize
from refusal_atlas.search.storage import study_guard
from refusal_atlas.workflows.reproduce.matched_kl import (
    RULE,
    StrengthFamily,
    compare_matched,
    matching_caveats,
    measure_matched,
)
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, ablate, over_bound_caveat, row, say
from refusal_atlas.workflows.som import som_step, validation_objective


# --- (b) ----------------------------------------------------------------------------------------------
def subset_curve(ctx: ReproduceContext, som: DirectionSet, mode: str) -> list[dict[str, Any]]:
    """Best subset of each size k (validation search), with its held-out logit refusal score."""
    ws, b = ctx.ws, ctx.budget
    kl_threshold, n_startup = ws.settings.selection.kl_threshold, max(1, b.subset_trials // 2)
    objective = validation_objective(ws, ctx.sets, mode)
    out = []
    for k in range(1, min(b.k_max, len(som)) + 1):
        space = SubsetSpace.of(som, k)
        db = ws.run / "study.db"
        with study_guard(db):
            identity = subset_identity(space, som, objective.fingerprint(), seed=b.seed, mode=mode,  # type: ignore
                                       n_startup_trials=n_startup)
            study = open_study(db, f"reproduce-som-{mode}-k{k}", identity)
            n_new = max(0, b.subset_trials - len(completed(study)))
            if n_new:  # no per-study DIM reference: DIM is measured once, on held-out prompts, by the row
                run_trials(study, som, objective, space, seed=b.seed, mode=mode,  # type: ignore[arg-type]
                           n_startup_trials=n_startup, n_trials=n_new)
            recorded = subset_settings(k, None, seed=b.seed, mode=mode, kl_threshold=kl_threshold,  # type: ignore
                                       n_startup_trials=n_startup)
            summary = summarize(study, kl_threshold, recorded, mode)
        chosen = summary["chosen"]
        spec = ablate(som.select(chosen["ids"]), mode, label=f"ablate:som{chosen['ids']}:{mode}")
        out.append({"k": k, "ids": chosen["ids"], "val_refusal": chosen["refusal"], "val_kl": chosen["kl"],
                    "heldout_score": ctx.score_record(spec)})
    return out


def pick_k(curve: list[dict[str, Any]], kl_threshold: float) -> dict[str, Any]:
    """The search's own rule across k, on validation numbers only: lowest refusal with KL ≤ threshold."""
    ok = [c for c in curve if c["val_kl"] <= kl_threshold]
    return min(ok, key=lambda c: (c["val_refusal"], c["k"])) if ok else min(curve, key=lambda c: (c["val_kl"], c["k"]))


def row_b(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    ws, b = ctx.ws, ctx.budget
    builder = SomDirections(grid=b.som_grid, iterations=b.som_iterations, seed=b.seed)
    som = som_step(ws.run, builder, layer=ctx.dim.layer, resume=True)
    say(f"(b) SOM: {len(som)} live neurons of {b.som_grid[0]}x{b.som_grid[1]} on {som.meta['n_samples']} harmful "
        "train points")
    family = StrengthFamily(ctx, ["som"])
    dim = measure_matched(ctx, "DIM", family.dim)
    numbers: dict[str, Any] = {"baseline_refusal": ctx.refusal_rate(NoEdit()), "dim_refusal": dim["heldout_refusal"],
                               "dim_kl": dim["heldout_kl"], "dim_strength": {"value": dim["strength"], "ci95": None},
                               "dim_heldout_score": ctx.score_record(ablate(ctx.dim))}  # full: the k curve's line
    parts, curves, matched, picks = {}, {}, {"dim": dim}, []
    for mode in ("sequential", "subspace"):
        curve = subset_curve(ctx, som, mode)
        best = pick_k(curve, ws.settings.selection.kl_threshold)
        picks += over_bound_caveat(f"the SOM-k subset ({mode}, k = {best['k']})", best["val_kl"],
                                   ws.settings.selection.kl_threshold)
        m = measure_matched(ctx, f"SOM-k {mode}",
                            lambda s, ids=best["ids"], mode=mode: family.subset("som", ids, mode, s))
        m["k"], m["ids"] = best["k"], best["ids"]
        numbers[f"som_{mode}_refusal"], numbers[f"som_{mode}_kl"] = m["heldout_refusal"], m["heldout_kl"]
        numbers[f"som_{mode}_strength"] = {"value": m["strength"], "ci95": None}
        numbers[f"som_{mode}_best"] = {"k": best["k"], "ids": best["ids"]}
        parts[mode] = compare_matched(m, dim, f"held-out refusal SOM-k ({mode}) vs DIM")
        curves[mode], matched[f"som_{mode}"] = curve, m
        say(f"(b) {mode}: best k {best['k']} ids {best['ids']} at s={m['strength']:.3g} → refusal "
            f"{m['heldout_refusal']['rate']:.3f} (DIM {dim['heldout_refusal']['rate']:.3f} at s={dim['strength']:.3g})")
    verdict = parts["sequential"]  # the paper's ablation decides; exact subspace ablation is reported beside it
    caveats = [*ctx.caveats, *picks, *matching_caveats(list(matched.values()))]
    return row("the best SOM-k subset suppresses refusal more than DIM at the same damage (paper: sequential "
               "ablation)",
               f"refusal rate (greedy, {b.max_new_tokens} tokens, substring judge) and next-token KL on held-out "
               f"prompts, each method at its matched strength: {RULE} (target = the selection's KL bound "
               f"{matched['dim']['target_kl']:g}); subsets and k chosen on validation prompts only; curve = held-out "
               "logit refusal score of the best subset of each k at full strength",
               f"{ctx.harmful_pool} (refusal), {b.eval_harmless} (KL)", numbers["dim_refusal"]["n"], numbers, verdict,
               caveats, parts={m: v.to_dict() for m, v in parts.items()}, curves=curves, matched=matched,
               som={"n_directions": len(som), "hits": som.meta.get("hits"), "n_samples": som.meta.get("n_samples"),
                    "cos_to_dim": som.meta.get("cos_to_dim"), "layer": som.layer})
