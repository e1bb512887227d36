"""Claim rows (e) RepInd vs RDO⊥, (f) the SOM paper's geometry, (g) our searched edit; and the row table."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from refusal_atlas.activations import extract
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.workflows.gradient import rdo_step
from refusal_atlas.directions.repind import independence_layers, last_token_reps
from refusal_atlas.workflows.gradient import repind_step
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.evaluation.verdicts import all_of, lower_is_better, pearson_interval, positively_correlated
from refusal_atlas.workflows.reproduce_context import ReproduceContext
from refusal_atlas.workflows.reproduce_rows import (ablate, gradient_kw, load_or_train, row, row_a, row_b, row_c,
                                                    row_d, train_cfg)


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
    kw, cfg = gradient_kw(ctx), train_cfg(ctx, b.repind_steps)
    dirs = {"repind": load_or_train(ctx, "repind", lambda: repind_step(ws, cfg=cfg, **kw)),
            "rdo_orth": load_or_train(ctx, "rdo_orth", lambda: rdo_step(ws, orthogonal=True, cfg=cfg, **kw))}
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
               b.eval_harmful, b.n_logit, numbers, verdict, per_layer={"layers": layers, **per_layer})


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
               f"{b.eval_harmful} + {b.eval_harmless}", {"prompts": b.n_logit, "points": len(points)}, numbers,
               verdict, points=points)


# --- (g) ----------------------------------------------------------------------------------------------
def row_g(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    from refusal_atlas.edits import load_run_edit
    from refusal_atlas.workflows.search import EditSearchSettings, edit_search_step

    b, ws = ctx.budget, ctx.ws
    settings = EditSearchSettings(seed=b.seed, kl_threshold=ws.cfg.kl_threshold, sets=("som",),
                                  n_startup_trials=max(1, min(10, b.edit_trials // 2)))
    summary = edit_search_step(ws, ctx.sets, settings, until=b.edit_trials)
    edit = load_run_edit(ws.run.path, "search_best")
    best_b = done["b"]["numbers"]["som_sequential_best"]
    som = DirectionSet.load(ws.run.direction_path("som"))
    som_spec = ablate(som.select(best_b["ids"]), "sequential", label=f"ablate:som{best_b['ids']}:sequential")
    numbers: dict[str, Any] = {}
    for name, spec in (("search", edit), ("dim", ablate(ctx.dim)), ("som", som_spec)):
        numbers[f"{name}_refusal"], numbers[f"{name}_kl"] = ctx.refusal_rate(spec), ctx.kl(spec)
    parts = [lower_is_better(numbers["search_refusal"], numbers["dim_refusal"], "refusal search vs DIM"),
             lower_is_better(numbers["search_refusal"], numbers["som_refusal"], "refusal search vs SOM-k")]
    return row("our searched edit suppresses refusal more than DIM and than the best SOM-k subset",
               f"refusal rate on the same held-out prompts (greedy, substring) and KL; edit chosen on validation "
               f"after {summary['n_trials']['complete']} trials ({summary['chosen']['why']})",
               f"{b.eval_harmful} (refusal), {b.eval_harmless} (KL)", numbers["dim_refusal"]["n"], numbers,
               all_of(parts), edit={"label": edit.label, "fingerprint": edit.fingerprint(),
                                    "choice": summary["chosen"].get("choice")},
               parts=[p.to_dict() for p in parts])


ROW_FUNCTIONS = {"a": row_a, "b": row_b, "c": row_c, "d": row_d, "e": row_e, "f": row_f, "g": row_g}
