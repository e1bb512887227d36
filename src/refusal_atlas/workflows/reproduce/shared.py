"""What every claim row receives (the workspace, prompt sets, budget, cached baselines) and the
helpers rows share: the row record, ablation, gradient-training settings.

Every row returns the claim, what was measured, the held-out prompts and n, the numbers with 95%
intervals, and a verdict by a rule from evaluation/verdicts.py whose text is stored with it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.evaluate import evaluate_refusal
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.settings import TrainingSettings
from refusal_atlas.workflows.reproduce.budget import ReproduceBudget
from refusal_atlas.workflows.workspace import PromptSets, Workspace

ROW_IDS = ("a", "b", "c", "d", "e", "f", "g")


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
    _cache: dict[str, Any] = field(default_factory=dict)

    # --- held-out prompts ----------------------------------------------------------------------
    def prompts(self, name: str, n: int) -> list[Prompt]:
        key = f"prompts:{name}:{n}"
        if key not in self._cache:
            self._cache[key] = load_prompts(name, n=n, seed=self.budget.seed)
        return self._cache[key]

    @property
    def eval_harmful(self) -> list[Prompt]:
        return self.prompts(self.budget.eval_harmful, self.budget.n_eval)

    @property
    def eval_harmless(self) -> list[Prompt]:
        return self.prompts(self.budget.eval_harmless, self.budget.n_eval)

    @property
    def logit_harmful(self) -> list[Prompt]:
        return self.prompts(self.budget.eval_harmful, self.budget.n_logit)

    # --- measurements --------------------------------------------------------------------------
    def refusal_rate(self, spec, dataset: str | None = None, n: int | None = None) -> dict[str, Any]:
        """Greedy generation + substring judge on a held-out set (completions reused on a rerun)."""
        dataset = dataset or self.budget.eval_harmful
        prompts = self.prompts(dataset, n or self.budget.n_eval)
        rec = evaluate_refusal(self.ws.adapter, self.ws.chat, prompts, dataset, spec,
                               max_new_tokens=self.budget.max_new_tokens, batch_size=self.budget.batch_size,
                               completions_path=self.ws.run.completions_path(dataset, spec.label),
                               stop_when_decided=True)
        self.ws.run.add_metrics([rec])
        return {"rate": rec["rate"], "ci95": rec["ci95"], "n": rec["n"], "dataset": dataset,
                "metric": rec["metric"], "intervention": rec["intervention"], "max_new_tokens": rec["max_new_tokens"]}

    def kl(self, spec, prompts: Sequence[Prompt] | None = None) -> dict[str, Any]:
        """Mean next-token KL(base ‖ edited) on held-out harmless prompts, bootstrap 95% interval."""
        prompts = list(prompts or self.eval_harmless)
        texts = [p.instruction for p in prompts]
        key = f"base_lp:{hash(tuple(texts))}"
        if key not in self._cache:
            self._cache[key] = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size)
        new = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size, intervention=spec)
        values = next_token_kl(self._cache[key], new).tolist()
        return {**mean_record(values, seed=self.budget.seed), "dataset": self.budget.eval_harmless}

    def scores(self, spec=None, prompts: Sequence[Prompt] | None = None) -> list[float]:
        """Per-prompt logit refusal scores (one forward pass each) on held-out harmful prompts."""
        texts = [p.instruction for p in (prompts or self.logit_harmful)]
        lp = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size, intervention=spec)
        return [float(s) for s in refusal_score(lp, self.ws.refusal_ids)]

    def score_record(self, spec=None, prompts: Sequence[Prompt] | None = None) -> dict[str, Any]:
        return {**mean_record(self.scores(spec, prompts), seed=self.budget.seed), "dataset": self.budget.eval_harmful,
                "metric": "mean logit refusal score (log-odds of a refusal-start token)"}


# --- rows on disk ------------------------------------------------------------------------------------


def row(claim: str, measured: str, prompts: str, n: Any, numbers: dict, verdict, **extra: Any) -> dict[str, Any]:
    return {"claim": claim, "measured": measured, "prompts": prompts, "n": n, "numbers": numbers,
            "verdict": verdict.to_dict(), **extra}


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
