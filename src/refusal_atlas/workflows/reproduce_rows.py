"""Claim rows (a)–(d) of `refusal-atlas reproduce`; (e)–(g) are in reproduce_rows_more.py.

Every row returns: the claim, what was measured, the held-out prompts and n, the numbers with 95%
intervals, and a verdict by a rule from evaluation/verdicts.py whose text is stored with it.
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.activations import load_activation_sets
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.cone import cone_eval_directions
from refusal_atlas.workflows.gradient import cone_step
from refusal_atlas.directions.optim import TrainConfig
from refusal_atlas.workflows.gradient import rdo_step
from refusal_atlas.directions.som import SomDirections
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.evaluation.verdicts import all_of, lower_is_better, separated, within_tolerance
from refusal_atlas.interventions import Intervention
from refusal_atlas.search import SearchSettings, completed, open_study, run_trials, summarize
from refusal_atlas.search.storage import study_guard
from refusal_atlas.workflows.reproduce_context import ReproduceContext, say
from refusal_atlas.workflows.som import som_step, validation_objective

SOM_EQUALS_DIM_TOLERANCE = 1e-4  # float32 storage of the vectors; the algebra is exact


def row(claim: str, measured: str, prompts: str, n: Any, numbers: dict, verdict, **extra: Any) -> dict[str, Any]:
    return {"claim": claim, "measured": measured, "prompts": prompts, "n": n, "numbers": numbers,
            "verdict": verdict.to_dict(), **extra}


def ablate(directions, mode: str = "subspace", label: str | None = None) -> Intervention:
    return Intervention("ablate", directions, mode=mode, label=label)  # type: ignore[arg-type]


# --- (a) ----------------------------------------------------------------------------------------------
def row_a(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    """A 1-neuron SOM with η_t = 1/(t+1) is the running mean: its direction equals DIM."""
    acts = load_activation_sets(ctx.ws.run / "activations.safetensors")
    layer = ctx.dim.layer
    harmful, harmless = acts["harmful"], acts["harmless"]
    dim = (harmful.mean_at(layer, -1) - harmless.mean_at(layer, -1)).to(torch.float64)

    def rel_error(builder: SomDirections) -> float:
        v = builder.fit(harmful, harmless, layer).vectors[0].to(torch.float64)
        return float((v - dim).norm() / dim.norm())

    n = harmful.last.shape[0]  # type: ignore[union-attr]
    inverse = rel_error(SomDirections(grid=(1, 1), lr=1.0, lr_schedule="inverse", iterations=n, seed=ctx.budget.seed))
    paper = rel_error(SomDirections(grid=(1, 1), seed=ctx.budget.seed))  # asymptotic decay, lr 0.01: a contrast
    verdict = within_tolerance(inverse, SOM_EQUALS_DIM_TOLERANCE)
    return row("a 1-neuron SOM with the 1/t schedule equals DIM",
               f"relative error ‖SOM − DIM‖/‖DIM‖ at layer {layer} (train representations; exact, no sampling)",
               f"{ctx.budget.harmful_train} (train, filtered)", n,
               {"relative_error_inverse_schedule": {"value": inverse, "ci95": None},
                "relative_error_paper_schedule": {"value": paper, "ci95": None,
                                                  "note": "MiniSom asymptotic decay, lr 0.01, 10k updates"}},
               verdict, ci_note="deterministic computation: no sampling error, so no interval")


# --- (b) ----------------------------------------------------------------------------------------------
def subset_curve(ctx: ReproduceContext, som: DirectionSet, mode: str) -> list[dict[str, Any]]:
    """Best subset of each size k (validation search), with its held-out logit refusal score."""
    ws, b = ctx.ws, ctx.budget
    objective = validation_objective(ws, ctx.sets, mode)
    out = []
    for k in range(1, min(b.k_max, len(som)) + 1):
        settings = SearchSettings(k=k, seed=b.seed, mode=mode, kl_threshold=ws.cfg.kl_threshold,  # type: ignore
                                  n_startup_trials=max(1, b.subset_trials // 2))
        db = ws.run / "study.db"
        with study_guard(db):
            study = open_study(db, f"reproduce-som-{mode}-k{k}", settings.identity(som, objective.fingerprint()))
            n_new = max(0, b.subset_trials - len(completed(study)))
            if n_new:  # no per-study DIM reference: DIM is measured once, on held-out prompts, by the row
                run_trials(study, som, objective, settings, n_new)
            summary = summarize(study, settings)
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
    dim_spec = ablate(ctx.dim)
    dim_rate, dim_kl = ctx.refusal_rate(dim_spec), ctx.kl(dim_spec)
    base = ctx.refusal_rate(Intervention("none"))
    numbers: dict[str, Any] = {"baseline_refusal": base, "dim_refusal": dim_rate, "dim_kl": dim_kl,
                               "dim_heldout_score": ctx.score_record(dim_spec)}
    parts, curves = {}, {}
    for mode in ("sequential", "subspace"):
        curve = subset_curve(ctx, som, mode)
        best = pick_k(curve, ws.cfg.kl_threshold)
        spec = ablate(som.select(best["ids"]), mode, label=f"ablate:som{best['ids']}:{mode}")
        rate, kl = ctx.refusal_rate(spec), ctx.kl(spec)
        numbers[f"som_{mode}_refusal"], numbers[f"som_{mode}_kl"] = rate, kl
        numbers[f"som_{mode}_best"] = {"k": best["k"], "ids": best["ids"]}
        parts[mode] = lower_is_better(rate, dim_rate, "held-out refusal SOM-k vs DIM")
        curves[mode] = curve
        say(f"(b) {mode}: best k {best['k']} ids {best['ids']} → refusal {rate['rate']:.2f} (DIM {dim_rate['rate']:.2f})")
    verdict = parts["sequential"]  # the paper's ablation decides; exact subspace ablation is reported beside it
    return row("the best SOM-k subset suppresses refusal more than DIM (paper: sequential ablation)",
               "refusal rate (greedy, substring judge) and next-token KL on held-out prompts; subsets and k chosen "
               "on validation prompts only; curve = held-out logit refusal score of the best subset of each k",
               f"{b.eval_harmful} (refusal), {b.eval_harmless} (KL)", dim_rate["n"], numbers, verdict,
               parts={m: v.to_dict() for m, v in parts.items()}, curves=curves,
               som={"n_directions": len(som), "hits": som.meta.get("hits"), "n_samples": som.meta.get("n_samples"),
                    "cos_to_dim": som.meta.get("cos_to_dim"), "layer": som.layer})


# --- (c) ----------------------------------------------------------------------------------------------
def train_cfg(ctx: ReproduceContext, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, seed=ctx.budget.seed, batch_size=ctx.budget.grad_batch,
                       micro_batch=min(4, ctx.budget.grad_batch), eval_every=max(1, min(4, steps // 2)))


def gradient_kw(ctx: ReproduceContext) -> dict[str, int]:
    b = ctx.budget
    return {"n_train": b.grad_n_train, "n_val": b.grad_n_val, "target_tokens": b.target_tokens}


def load_or_train(ctx: ReproduceContext, name: str, train) -> DirectionSet:
    path = ctx.ws.run.direction_path(name)
    if path.exists():
        return DirectionSet.load(path)
    result = train()
    return result[-1] if isinstance(result, list) else result


def row_c(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    b = ctx.budget
    rdo = load_or_train(ctx, "rdo", lambda: rdo_step(ctx.ws, cfg=train_cfg(ctx, b.rdo_steps), **gradient_kw(ctx)))
    specs = {"none": Intervention("none"), "dim": ablate(ctx.dim), "rdo": ablate(rdo)}
    numbers: dict[str, Any] = {}
    for name, spec in specs.items():
        numbers[f"{name}_refusal"] = ctx.refusal_rate(spec)
        numbers[f"{name}_xstest_over_refusal"] = ctx.refusal_rate(spec, "xstest", b.n_xstest)
        if name != "none":
            numbers[f"{name}_kl"] = ctx.kl(spec)
    numbers["cos_rdo_dim"] = {"value": float(rdo.unit()[0] @ ctx.dim.unit()[0]), "ci95": None}
    verdict = lower_is_better(numbers["rdo_kl"], numbers["dim_kl"], "held-out KL RDO vs DIM")
    side = {"refusal": lower_is_better(numbers["rdo_refusal"], numbers["dim_refusal"], "refusal RDO vs DIM").to_dict(),
            "over_refusal": lower_is_better(numbers["rdo_xstest_over_refusal"], numbers["dim_xstest_over_refusal"],
                                            "XSTest over-refusal RDO vs DIM").to_dict()}
    return row("RDO's ablation damages harmless behaviour less than DIM's (lower KL), refusal and over-refusal beside",
               f"next-token KL on held-out harmless prompts (bootstrap CI); refusal rate; XSTest over-refusal "
               f"(RDO trained {rdo.meta.get('train', {}).get('steps')} steps, best step {rdo.meta.get('best_step')})",
               f"{b.eval_harmless} (KL), {b.eval_harmful} (refusal), xstest (over-refusal)",
               numbers["dim_kl"]["n"], numbers, verdict, parts=side)


# --- (d) ----------------------------------------------------------------------------------------------
def row_d(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    b, ws = ctx.budget, ctx.ws
    rdo = load_or_train(ctx, "rdo", lambda: rdo_step(ws, cfg=train_cfg(ctx, b.rdo_steps), **gradient_kw(ctx)))
    if not ws.run.direction_path(f"cone_k{b.cone_k_max}").exists():
        cone_step(ws, k_min=2, k_max=b.cone_k_max, warm_start="rdo", n_eval_samples=0,
                  cfg=train_cfg(ctx, b.cone_steps), **gradient_kw(ctx))
    gen = torch.Generator().manual_seed(b.seed + 4242)
    randoms = torch.nn.functional.normalize(torch.randn(b.n_random, ws.adapter.d_model, generator=gen), dim=1)
    random_scores = [mean_record(ctx.scores(ablate(r.reshape(1, -1), label="ablate:random")))["mean"] for r in randoms]
    baseline = ctx.score_record()
    per_k, parts = [], []
    for k in range(1, b.cone_k_max + 1):
        if k == 1:  # a 1-dimensional cone is one direction: RDO
            samples = rdo.unit()
        else:
            cone = DirectionSet.load(ws.run.direction_path(f"cone_k{k}"))
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
               f"{b.eval_harmful}", {"prompts": b.n_logit, "samples_per_k": b.cone_samples, "random": b.n_random},
               {"baseline_score": baseline, "random_scores": random_scores,
                "per_k": {str(p["k"]): p["summary"] for p in per_k}},
               all_of(parts), per_k=per_k)
