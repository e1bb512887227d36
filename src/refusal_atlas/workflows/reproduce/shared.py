"""What every claim row receives (the workspace, prompt sets, budget, cached baselines) and the
helpers rows share: the row record, ablation, gradient-training settings, the held-out pool, the
selection caveats and the training curves.

Every row returns the claim, what was measured, the held-out prompts and n, the numbers with 95%
intervals, and a verdict by a rule from evaluation/verdicts.py whose text is stored with it.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_atlas.core.errors import DataError
from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.evaluate import evaluate_refusal
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.evaluation.stats import mean_record, rate_record
from refusal_atlas.settings import TrainingSettings
from refusal_atlas.workflows.reproduce.budget import ReproduceBudget
from refusal_atlas.workflows.workspace import PromptSets, Workspace

ROW_IDS = ("a", "b", "c", "d", "e", "f", "g")
ROWS_USING_DIM = ("b", "c", "e", "g")  # rows whose numbers include the selected DIM direction's ablation
CAVEAT_KL_FACTOR = 2.0  # a chosen DIM candidate above this many times the KL bound is flagged in its rows
FULL_STRENGTH_NOTE = ("rows that ablate DIM at full strength ((c), (e)) compare it at that damage; rows (b) and (g) "
                      "compare it at its matched-KL strength")


SETTINGS_FILE = "reproduce/settings.json"


def say(text: str) -> None:
    print(f"[reproduce] {text}", file=sys.stderr, flush=True)


@dataclass
class ReproduceContext:
    """The loaded workspace plus the held-out prompt sets and cached baselines every row shares."""

    ws: Workspace
    sets: PromptSets
    budget: ReproduceBudget
    dim: DirectionSet
    caveats: list[str] = field(default_factory=list)  # about the DIM selection; carried by ROWS_USING_DIM
    _cache: dict[str, Any] = field(default_factory=dict)

    # --- held-out prompts ----------------------------------------------------------------------
    def prompts(self, name: str, n: int) -> list[Prompt]:
        key = f"prompts:{name}:{n}"
        if key not in self._cache:
            self._cache[key] = load_prompts(name, n=n, seed=self.budget.seed)
        return self._cache[key]

    @property
    def harmful_pool(self) -> str:
        """The name the held-out harmful pool is recorded under (its sets, joined)."""
        return "+".join(self.sets.eval_harmful)

    @property
    def eval_harmful(self) -> list[Prompt]:
        return [p for prompts in self.sets.eval_harmful.values() for p in prompts]

    @property
    def eval_harmless(self) -> list[Prompt]:
        return self.sets.eval_harmless

    @property
    def logit_harmful(self) -> list[Prompt]:
        return self.eval_harmful[: self.budget.n_logit]

    # --- measurements --------------------------------------------------------------------------
    def refusal_rate(self, spec, dataset: str | None = None, n: int | None = None) -> dict[str, Any]:
        """Greedy generation + substring judge (completions reused on a rerun): on the pooled held-out
        harmful sets, one rate over all of them (per-set rates beside), or on one named set."""
        groups = (dict(self.sets.eval_harmful) if dataset is None
                  else {dataset: self.prompts(dataset, n or self.budget.n_eval)})
        # generation uses the run's generation batch, as `evaluate` does: decoding is step-bound, so it pays to
        # batch more prompts than the budget's forward-pass batch
        batch = self.ws.settings.evaluation.generation_batch_size
        records = [evaluate_refusal(self.ws.adapter, self.ws.chat, prompts, name, spec,
                                    max_new_tokens=self.budget.max_new_tokens, batch_size=batch,
                                    completions_path=self.ws.run.completions_path(name, spec.label),
                                    stop_when_decided=True)
                   for name, prompts in groups.items()]
        self.ws.run.add_metrics(records)
        return pooled_rate(records)

    def kl(self, spec, prompts: Sequence[Prompt] | None = None, dataset: str | None = None) -> dict[str, Any]:
        """Mean next-token KL(base ‖ edited) on held-out harmless prompts (or ``prompts``, named ``dataset``),
        bootstrap 95% interval."""
        prompts = list(prompts or self.eval_harmless)
        texts = [p.instruction for p in prompts]
        key = f"base_lp:{hash(tuple(texts))}"
        if key not in self._cache:
            self._cache[key] = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size)
        new = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size, intervention=spec)
        values = next_token_kl(self._cache[key], new).tolist()
        return {**mean_record(values, seed=self.budget.seed), "dataset": dataset or self.budget.eval_harmless}

    def scores(self, spec=None, prompts: Sequence[Prompt] | None = None) -> list[float]:
        """Per-prompt logit refusal scores (one forward pass each) on held-out harmful prompts."""
        texts = [p.instruction for p in (prompts or self.logit_harmful)]
        lp = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size, intervention=spec)
        return [float(s) for s in refusal_score(lp, self.ws.refusal_ids)]

    def score_record(self, spec=None, prompts: Sequence[Prompt] | None = None,
                     dataset: str | None = None) -> dict[str, Any]:
        return {**mean_record(self.scores(spec, prompts), seed=self.budget.seed),
                "dataset": dataset or self.harmful_pool,
                "metric": "mean logit refusal score (log-odds of a refusal-start token)"}


# --- the held-out pool --------------------------------------------------------------------------------
def _key(text: str) -> str:
    return " ".join(text.lower().split())


def held_out_pool(names: Sequence[str], n: int, seed: int, exclude: Iterable[Prompt] = ()) -> dict[str, list[Prompt]]:
    """``n`` held-out prompts from the sets ``names``, in that order: each set shuffled with
    ``seed``, prompts already seen (in an earlier set, or in ``exclude``: the train and validation prompts;
    compared case- and space-blind) dropped, the last sets filling what the earlier ones leave. Fewer than
    ``n`` in all is an error: a rate on fewer prompts than the budget says would read as more certain."""
    seen = {_key(p.instruction) for p in exclude}
    out: dict[str, list[Prompt]] = {}
    total = 0
    for name in names:
        fresh = []
        for p in load_prompts(name):
            if _key(p.instruction) not in seen:
                seen.add(_key(p.instruction))
                fresh.append(p)
        random.Random(seed).shuffle(fresh)
        take = fresh[: n - total]
        if take:
            out[name] = take
            total += len(take)
    if total < n:
        raise DataError(f"the held-out sets {', '.join(names)} hold only {total} prompts outside the train "
                        f"and validation splits; lower n_eval to at most {total} or add a set")
    return out


def pooled_rate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One refusal rate (Wilson 95% interval) over several sets' judged records, each set's own beside."""
    count, n = sum(r["count"] for r in records), sum(r["n"] for r in records)
    if n == 0:
        raise ValueError("no judged responses to pool")
    first = records[0]
    return {**rate_record(count, n), "dataset": "+".join(r["dataset"] for r in records),
            "metric": first["metric"], "intervention": first["intervention"],
            "max_new_tokens": first["max_new_tokens"],
            "per_set": {r["dataset"]: {"rate": r["rate"], "ci95": r["ci95"], "n": r["n"]} for r in records}}


# --- the DIM selection's caveats ----------------------------------------------------------------------
def selection_caveats(selection: Mapping[str, Any] | None, kl_threshold: float,
                      measured_kl: float | None = None) -> list[str]:
    """What a row built on the selected DIM direction must say about how it was chosen.

    ``selection``: selection.json (chosen layer/position, ``relaxed_filters``, every candidate's validation
    numbers); None when the layer was fixed, then ``measured_kl`` (its validation KL) is judged alone. A relaxed
    KL filter, or a chosen candidate whose validation KL exceeds CAVEAT_KL_FACTOR × the bound, is stated with
    both numbers; a relaxed induce filter is stated too (it changes which layer wins)."""
    out: list[str] = []
    kl, where = measured_kl, "the fixed layer"
    relaxed: list[str] = []
    if selection:
        relaxed = list(selection.get("relaxed_filters") or [])
        chosen = selection.get("chosen") or {}
        rec = next((c for c in selection.get("candidates", []) if c.get("layer") == chosen.get("layer")
                    and c.get("position") == chosen.get("position")), {})
        kl = rec.get("kl", kl)
        where = f"layer {chosen.get('layer')}"
    ratio = None if kl is None or kl_threshold <= 0 else kl / kl_threshold
    at = "at an unrecorded validation KL" if ratio is None else f"at validation KL {kl:.3g} ({ratio:.1f}x the bound)"
    if "kl" in relaxed:
        out.append(f"DIM selection relaxed its KL filter: no candidate had validation KL <= {kl_threshold:g}, and "
                   f"{where} was chosen {at}; {FULL_STRENGTH_NOTE}")
    elif ratio is not None and ratio > CAVEAT_KL_FACTOR:
        out.append(f"the DIM direction ({where}) has validation KL {kl:.3g}, {ratio:.1f}x the filter's bound "
                   f"{kl_threshold:g}; {FULL_STRENGTH_NOTE}")
    if "induce" in relaxed:
        out.append(f"DIM selection relaxed its induce filter: no candidate both passed the KL bound and induced "
                   f"refusal when added, so {where} was chosen without that check")
    return out


def over_bound_caveat(what: str, kl: float | None, bound: float) -> list[str]:
    """A validation pick (a SOM-k subset, the searched edit) whose validation KL at full strength exceeds
    CAVEAT_KL_FACTOR × the bound, said in its row: it is compared at its matched strength, but it was chosen
    among candidates that all damaged more than the bound allows."""
    if kl is None or bound <= 0 or kl <= CAVEAT_KL_FACTOR * bound:
        return []
    return [f"{what} was picked at validation KL {kl:.3g}, {kl / bound:.1f}x the bound {bound:g}; it is compared "
            "at its matched-KL strength"]


# --- gradient training curves -------------------------------------------------------------------------
def training_curve(direction: DirectionSet, init: Any = None) -> dict[str, Any]:
    """A trained direction's per-step training loss and its validation objective (step 0 = the start), with
    what shows whether it left its initialisation: the kept (best validated) step, the validation objective
    at the start and at that step and, when the start is known (``init``, [d] or [k, d]), |cos| with it."""
    meta = direction.meta
    if "runs" in meta:  # RepInd keeps one training record per direction and restart: its first direction's winner
        meta = min((r for r in meta["runs"] if r.get("direction", 0) == 0), key=lambda r: r["val_objective"])
    history, val = meta.get("history", {}), meta.get("val_history", [])
    loss = [float(x) for x in history.get("loss", [])]
    objective = [{"step": int(v["step"]), "objective": float(v["objective"])} for v in val if "objective" in v]
    best = int(meta.get("best_step", 0))
    at = {v["step"]: v["objective"] for v in objective}
    out: dict[str, Any] = {"loss": loss, "validation": objective, "best_step": best, "stopped": meta.get("stopped"),
                           "steps_run": len(loss), "val_objective_start": at.get(0),
                           "val_objective_best": at.get(best), "left_init": best > 0}
    if init is not None:
        import torch

        u, v = direction.unit()[0].to(torch.float64), torch.as_tensor(init).reshape(-1, direction.d_model)[0]
        v = v.to(torch.float64)
        out["cos_with_init"] = float(abs(u @ v) / (v.norm() * u.norm()).clamp_min(1e-12))
    return out


# --- rows on disk ------------------------------------------------------------------------------------


def row(claim: str, measured: str, prompts: str, n: Any, numbers: dict, verdict, caveats: Sequence[str] | None = None,
        **extra: Any) -> dict[str, Any]:
    """A row record; ``caveats`` (when given, even empty) are what a reader must know before the verdict."""
    out = {"claim": claim, "measured": measured, "prompts": prompts, "n": n, "numbers": numbers,
           "verdict": verdict.to_dict(), **extra}
    if caveats is not None:
        out["caveats"] = list(caveats)
    return out


def ablate(directions, mode: str = "subspace", label: str | None = None) -> DirectionalAblation:
    return DirectionalAblation.from_directions(directions, mode, label=label)  # type: ignore[arg-type]


# --- (c) ----------------------------------------------------------------------------------------------
def training(ctx: ReproduceContext, steps: int) -> TrainingSettings:
    """The budget's gradient training: its prompts and batch, ``steps`` steps, validated twice or every 4."""
    b = ctx.budget
    return TrainingSettings(n_train=b.grad_n_train, n_val=b.grad_n_val, target_tokens=b.target_tokens, steps=steps,
                            seed=b.seed, batch_size=b.grad_batch, micro_batch=min(4, b.grad_batch),
                            eval_every=max(1, min(4, steps // 2)))


def load_or_train(ctx: ReproduceContext, name: str, train) -> DirectionSet:
    path = ctx.ws.run.direction_path(name)
    if path.exists():
        return DirectionSet.load(path)
    result = train()
    return result[-1] if isinstance(result, list) else result
