"""Claim (d): every direction of a refusal cone suppresses refusal more than random directions.
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.cone import cone_eval_directions
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.evaluation.verdicts import all_of, separated
from refusal_atlas.workflows.gradient import cone_step, rdo_step
from refusal_atlas.workflows.reproduce import shared
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, ablate, load_or_train, row, training


# --- (d) ----------------------------------------------------------------------------------------------
def row_d(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    b, ws = ctx.budget, ctx.ws
    rdo = load_or_train(ctx, "rdo", lambda: rdo_step(ws, training(ctx, b.rdo_steps)))
    if not ws.run.direction_path(f"cone_k{b.cone_k_max}").exists():
        cone_step(ws, training(ctx, b.cone_steps), k_min=2, k_max=b.cone_k_max, warm_start="rdo", n_eval_samples=0)
    gen = torch.Generator().manual_seed(b.seed + 4242)
    randoms = torch.nn.functional.normalize(torch.randn(b.n_random, ws.adapter.d_model, generator=gen), dim=1)
    random_scores = [mean_record(ctx.scores(ablate(r.reshape(1, -1), label="ablate:random")))["mean"] for r in randoms]
    baseline = ctx.score_record()
    per_k, parts, curves = [], [], {}
    for k in range(1, b.cone_k_max + 1):
        if k == 1:  # a 1-dimensional cone is one direction: RDO
            samples = rdo.unit()
        else:
            cone = DirectionSet.load(ws.run.direction_path(f"cone_k{k}"))
            curves[f"cone_k{k}"] = shared.training_curve(cone)
            samples, _ = cone_eval_directions(cone.unit(), b.cone_samples, 0, seed=b.seed + 42)
        scores = [mean_record(ctx.scores(ablate(s.reshape(1, -1), label=f"ablate:cone_k{k}")))["mean"]
                  for s in samples]
        v = separated(scores, random_scores, f"k={k} cone samples vs random directions (mean refusal score)")
        parts.append(v)
        per_k.append({"k": k, "sample_scores": scores, "summary": mean_record(scores, seed=b.seed),
                      "verdict": v.to_dict()})
    return row("every direction sampled from a refusal cone of dimension 1..K suppresses refusal more than random "
               "directions",
               "mean logit refusal score on held-out harmful prompts under ablation of each sampled cone direction "
               "vs each random unit direction",
               ctx.harmful_pool, {"prompts": b.n_logit, "samples_per_k": b.cone_samples, "random": b.n_random},
               {"baseline_score": baseline, "random_scores": random_scores,
                "per_k": {str(p["k"]): p["summary"] for p in per_k}},
               all_of(parts), per_k=per_k, training=curves)
