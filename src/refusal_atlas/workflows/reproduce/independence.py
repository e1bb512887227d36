"""Claim (e): RepInd is representationally independent of DIM where RDO⊥ is not.
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.directions.repind import independence_layers, last_token_reps
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.evaluation.verdicts import lower_is_better
from refusal_atlas.workflows.gradient import rdo_step, repind_step
from refusal_atlas.workflows.reproduce import shared
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, ablate, load_or_train, row, training


# --- (e) ----------------------------------------------------------------------------------------------
def _cos(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, S] cosine of every row of h [N, S, d] with the direction u."""
    u = u.to(h.dtype)
    return (h @ (u / u.norm())) / h.norm(dim=-1).clamp_min(1e-12)


def cross_change_per_prompt(ctx: ReproduceContext, r: torch.Tensor, clean, minus_v, v: torch.Tensor, layers):
    """Per prompt: mean over layers of |Δcos(v) under r-ablation| and |Δcos(r) under v-ablation|, averaged."""
    texts = [p.instruction for p in ctx.logit_harmful]
    minus_r = last_token_reps(ctx.ws.adapter, ctx.ws.chat, texts, layers, r, ctx.budget.batch_size)
    a = (_cos(minus_r, v) - _cos(clean, v)).abs()
    b = (_cos(minus_v, r) - _cos(clean, r)).abs()
    return ((a.mean(1) + b.mean(1)) / 2).tolist(), ((a + b) / 2).mean(0).tolist()


def row_e(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    b, ws = ctx.budget, ctx.ws
    t = training(ctx, b.repind_steps)
    dirs = {"repind": load_or_train(ctx, "repind", lambda: repind_step(ws, t)),
            "rdo_orth": load_or_train(ctx, "rdo_orth", lambda: rdo_step(ws, t, orthogonal=True))}
    layers = independence_layers(ws.adapter.n_layers)
    texts = [p.instruction for p in ctx.logit_harmful]
    v = ctx.dim.unit()[0]
    clean = last_token_reps(ws.adapter, ws.chat, texts, layers, None, b.batch_size)
    minus_v = last_token_reps(ws.adapter, ws.chat, texts, layers, v, b.batch_size)
    numbers, per_layer = {"baseline_score": ctx.score_record()}, {}
    for name, d in dirs.items():
        per_prompt, per_layer[name] = cross_change_per_prompt(ctx, d.unit()[0], clean, minus_v, v, layers)
        numbers[f"{name}_cross_ablation_change"] = mean_record(per_prompt, seed=b.seed)
        numbers[f"{name}_score"] = ctx.score_record(ablate(d.select([d.ids[0]])))
        numbers[f"{name}_cos_with_dim"] = {"value": float(d.unit()[0] @ v), "ci95": None}
    verdict = lower_is_better(numbers["repind_cross_ablation_change"], numbers["rdo_orth_cross_ablation_change"],
                              "mean |Δcos| with DIM, RepInd vs RDO⊥")
    return row("RepInd is representationally independent of DIM where RDO⊥ (merely orthogonal) is not",
               "cross-ablation cosine change with DIM at the last prompt token of layers < 0.9·L (per prompt, "
               "mean over layers), and each direction's ablation refusal score",
               ctx.harmful_pool, b.n_logit, numbers, verdict, ctx.caveats, per_layer={"layers": layers, **per_layer},
               training={name: shared.training_curve(d) for name, d in dirs.items()})
