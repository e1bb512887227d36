"""Claim (f): ablating SOM directions moves the harmful centroid onto the harmless one, tracking refusal.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.evaluation.verdicts import pearson_interval, positively_correlated
from refusal_atlas.model.activations import extract
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, ablate, row


# --- (f) ----------------------------------------------------------------------------------------------
def _reps(ctx: ReproduceContext, prompts, spec, layer: int) -> torch.Tensor:
    with (spec.apply(ctx.ws.adapter) if spec is not None else nullcontext()):
        acts = extract(ctx.ws.adapter, ctx.ws.chat, [p.instruction for p in prompts], layers=[layer], positions=[-1],
                       batch_size=ctx.budget.batch_size, desc="reproduce: geometry")
    return acts.last[:, 0].to(torch.float64)  # type: ignore[index]


def row_f(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    b, ws = ctx.budget, ctx.ws
    som = DirectionSet.load(ws.run.direction_path("som"))
    curve = done["b"]["curves"]["sequential"]
    ids = curve[-1]["ids"]  # the validated subset of the largest k, in the paper's sequential order
    layer = som.layer
    harmless = ctx.prompts(b.eval_harmless, b.n_logit)
    points = []
    for j in range(len(ids) + 1):
        spec = None if j == 0 else ablate(som.select(ids[:j]), "sequential", label=f"ablate:som{ids[:j]}:sequential")
        h, g = _reps(ctx, ctx.logit_harmful, spec, layer), _reps(ctx, harmless, spec, layer)
        centre = h.mean(0)
        points.append({"ablated": j, "ids": ids[:j], "centroid_distance": float((centre - g.mean(0)).norm()),
                       "compactness": float((h - centre).norm(dim=1).mean()),
                       "refusal_score": ctx.score_record(spec)})
    dist = [p["centroid_distance"] for p in points]
    comp = [p["compactness"] for p in points]
    score = [p["refusal_score"]["mean"] for p in points]
    verdict = positively_correlated(dist, score, "r(centroid distance, refusal score)")
    numbers = {"r_distance_refusal": pearson_interval(dist, score), "r_compactness_refusal": pearson_interval(comp, score),
               "distance_first_last": {"value": [dist[0], dist[-1]], "ci95": None},
               "compactness_first_last": {"value": [comp[0], comp[-1]], "ci95": None}}
    return row("ablating SOM directions moves the harmful centroid toward the harmless one, and that distance "
               "tracks refusal",
               f"at layer {layer}: ‖harmful − harmless centroid‖ and harmful compactness (mean distance to its "
               f"centroid) as 0..{len(ids)} directions are ablated (sequential), correlated with the refusal score",
               f"{ctx.harmful_pool} + {b.eval_harmless}", {"prompts": b.n_logit, "points": len(points)}, numbers,
               verdict, points=points)
