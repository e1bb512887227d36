"""The edit search's trial score, made cheaper without changing it: one prefix pass, two stages.

:class:`StagedObjective` computes exactly :class:`~refusal_atlas.evaluation.objective.ValidationObjective`'s
two numbers (mean logit refusal score on harmful validation prompts, mean next-token KL on harmless
ones; equal up to float rounding, tested), with two savings:

* **One shared prefix per trial.** The harmful and harmless prompts are tokenized once, together,
  so they share one chat-template prefix (prefix_cache). An edit touches every position, so the
  prefix keys/values are recomputed under each trial's edit — but once per trial for both sets
  and both stages, not once per prompt (nor once per set, as two separate passes would).
* **Two stages.** The first ``fraction`` of each prompt set is scored first. If those partial values
  are clearly dominated by a trial of the current Pareto front on the *same* prompts (:class:`PruneRule`),
  the trial stops there: the search records it PRUNED with its partial values (user attribute
  ``partial``), TPE counts it among the bad trials, and it never enters the front (Optuna's front
  holds only COMPLETE trials). Otherwise the rest of the prompts finish the trial.

Every scored trial stores its partial values, so later trials can be compared on equal prompts.

**The refusal number** (``refusal_stat``) aggregates the per-prompt first-token refusal log-odds s_i:
``probability`` (the default) is the mean of σ(s_i), the model's expected rate of starting a refusal;
``logodds`` is the mean of s_i itself. Both cost the same pass. They differ where it matters for a
front measured in refusal counts: the log-odds mean keeps rewarding an edit for pushing prompts that
no longer refuse further down (−4 → −8 counts as much as +2 → −2), so at the strong end it can prefer
a more damaging edit that flips no more verdicts; σ(s_i) saturates there and counts flips. Every trial
records both means (user attribute ``refusal_stats``) so bench/search_fidelity.py ranks each against
generation on the same trials.

``score_tokens = m > 0`` (off by default) makes the refusal number the substring refusal rate of m greedy
tokens per harmful prompt (decoded on the same prefix keys/values; a row stops once a refusal phrase
appears) with ties broken by the logit score: rate + (0.5/n)·σ(mean log-odds), so the rate's 1/n steps
always win. It costs m decoding steps per harmful prompt (bench/search_fidelity.py measures the
trade-off); the KL number is unchanged.

**A capability task** (``task``, :mod:`refusal_atlas.evaluation.capability`) adds a third number, the task loss,
scored under the same edit with the first stage (its items are few and it has no stages of its own), so the
first-stage values are (refusal, KL, task loss) and a trial is pruned only if a front trial is also no worse on
the task: a trial that keeps more capability is never stopped for its refusal and KL alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits.ablation import DirectionalAblation
from refusal_atlas.evaluation.damage import kl_against, kl_base_terms
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.model.adapter import float32_head_output
from refusal_atlas.model.prefix_cache import (
    PrefixPlan,
    budget_batches,
    head_apart,
    keep_last,
    last_logprobs,
    last_position,
    supports_prefix_reuse,
)

REFUSAL_STATS = ("probability", "logodds")
MAX_KL = "max_kl"  # pruned_by of a trial stopped because its first-stage KL lies clearly above the KL cap
# PruneRule's refusal margin per statistic: 0.5 log-odds, or 0.05 of expected refusal rate (about 1 prompt in 20)
REFUSAL_MARGINS = {"logodds": 0.5, "probability": 0.05}


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def check_refusal_stat(stat: str) -> str:
    """``stat`` if it names a refusal statistic, else a ConfigError."""
    if stat not in REFUSAL_STATS:
        raise ConfigError(f"unknown refusal statistic {stat!r}; choose one of {', '.join(REFUSAL_STATS)}")
    return stat


def refusal_statistic(scores: Sequence[float], stat: str) -> float:
    """Per-prompt refusal log-odds → the trial's refusal number: their mean (``logodds``) or the mean
    first-token refusal probability σ(s) (``probability``)."""
    check_refusal_stat(stat)
    if not scores:
        raise ValueError("no refusal scores")
    values = scores if stat == "logodds" else [_sigmoid(x) for x in scores]
    return sum(values) / len(values)


@dataclass(frozen=True)
class PruneRule:
    """When a trial's first-stage values count as clearly dominated (both objectives minimised).

    A trial with partial values (r, k) on the first ``fraction`` of the prompts is pruned iff some
    trial F of the current Pareto front (full values), scored on the same first prompts as (r_F, k_F),
    is better on both by a margin: r_F + ``refusal_margin`` <= r and k_F × ``kl_ratio`` + ``kl_margin`` <= k.
    The margins stand for what the remaining prompts could still change. With a task objective (a third value,
    already final after the first stage) F must also have task loss t_F <= t.
    """

    fraction: float = 0.25
    refusal_margin: float = REFUSAL_MARGINS["logodds"]  # in the refusal statistic's units (for_statistic)
    kl_ratio: float = 1.5
    kl_margin: float = 0.002

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"the pruning fraction must be in (0, 1), got {self.fraction}")
        if self.refusal_margin < 0 or self.kl_ratio < 1 or self.kl_margin < 0:
            raise ConfigError("pruning margins must be >= 0 and kl_ratio >= 1")

    @classmethod
    def for_statistic(cls, stat: str, **kwargs) -> PruneRule:
        """The default rule with the refusal margin in ``stat``'s units."""
        return cls(**{"refusal_margin": REFUSAL_MARGINS[check_refusal_stat(stat)], **kwargs})

    def dominating(self, partial: tuple[float, ...], front: Sequence[tuple[int, tuple[float, ...]]]) -> int | None:
        """The number of the first front trial whose partial values clearly dominate ``partial``, else None."""
        r, k = partial[:2]
        for number, values in front:
            fr, fk = values[:2]
            if (fr + self.refusal_margin <= r and fk * self.kl_ratio + self.kl_margin <= k
                    and all(f <= x for f, x in zip(values[2:], partial[2:]))):
                return number
        return None

    def over_cap(self, partial_kl: float, max_kl: float) -> bool:
        """Whether first-stage KL ``partial_kl`` lies clearly above a KL cap, by this rule's KL margins."""
        return partial_kl >= max_kl * self.kl_ratio + self.kl_margin

    def describe(self) -> str:
        return (f"pruned after {self.fraction:.0%} of the prompts iff a Pareto trial scored on the same prompts "
                f"has refusal <= this - {self.refusal_margin} and KL * {self.kl_ratio} + {self.kl_margin} <= this")


@dataclass
class TrialScore:
    partial: tuple[float, ...]  # (refusal, KL[, task loss]) on the first-stage prompts (the task's: all its items)
    n_partial: tuple[int, int]  # (harmful, harmless) prompts in the first stage
    values: tuple[float, ...] | None  # on every prompt; None when pruned
    pruned_by: int | str | None = None  # a dominating trial's number, or MAX_KL
    stats: dict[str, float] | None = None  # every refusal statistic over the prompts scored
    task: dict[str, Any] | None = None  # the capability task's record (loss, nll, accuracy, n)

    def record(self) -> dict[str, Any]:
        return {"refusal": self.partial[0], "kl": self.partial[1], "n_harmful": self.n_partial[0],
                "n_harmless": self.n_partial[1], **({"task": self.partial[2]} if len(self.partial) > 2 else {})}


def first_stage_sizes(n_harmful: int, n_harmless: int, fraction: float) -> tuple[int, int]:
    """How many prompts of each set the first stage scores (at least 1, fewer than all when possible)."""
    def size(n: int) -> int:
        return min(max(1, math.ceil(fraction * n)), max(1, n - 1))
    return size(n_harmful), size(n_harmless)


class StagedObjective(ValidationObjective):
    """ValidationObjective with a shared prefix per trial and a two-stage :meth:`score` (see module docstring)."""

    def __init__(self, adapter, chat, harmful: Sequence[str], harmless: Sequence[str], refusal_ids: Sequence[int],
                 *, batch_size: int = 16, fraction: float = PruneRule.fraction, score_tokens: int = 0,
                 refusal_stat: str = "probability", task=None):
        super().__init__(adapter, chat, harmful, harmless, refusal_ids, batch_size=batch_size, mode="subspace")
        self.task = task  # a CapabilityTask (evaluation/capability.py): the third objective, or None
        if score_tokens < 0:
            raise ConfigError(f"score_tokens must be >= 0, got {score_tokens}")
        self.score_tokens, self.refusal_stat = score_tokens, check_refusal_stat(refusal_stat)
        self.n1 = first_stage_sizes(len(self.harmful), len(self.harmless), fraction)
        nh = len(self.harmful)
        self.rows = self.harmful + self.harmless  # harmful rows 0..nh-1, harmless rows nh..
        first = [*range(self.n1[0]), *range(nh, nh + self.n1[1])]
        rest = [*range(self.n1[0], nh), *range(nh + self.n1[1], len(self.rows))]
        self.stages = [first, rest]
        self.plan = PrefixPlan(adapter, chat, self.rows, batch_size) if supports_prefix_reuse(adapter) else None
        float32_head_output(adapter.model)  # a no-op in float32; in bf16 it lowers the KL floor (adapter.py)
        self.prefix_passes = 0  # how many prefix K/V computations ran (tests check: one per trial)

    def _harmless_base(self) -> torch.Tensor:
        if self._base_lp is None:
            nh = len(self.harmful)
            self._base_lp = self._logprobs(list(range(nh, len(self.rows))), self._prefix_kv())
            self._base_terms = kl_base_terms(self._base_lp)
        return self._base_lp

    def _logprobs(self, rows: list[int], kv) -> torch.Tensor:
        """Next-token log-probs of ``rows`` (in that order) under whatever edit is active now (the LM head
        once over all rows where the model allows it: prefix_cache.head_apart)."""
        if self.plan is None:
            return next_token_logprobs(self.adapter, self.chat, [self.rows[i] for i in rows], self.batch_size,
                                       reuse_prefix=False)
        apart = head_apart(self.adapter, self.plan)
        last = None
        for batch in budget_batches([len(self.plan.suffixes[i]) for i in rows], self.batch_size):
            inputs = self.plan.inputs([rows[j] for j in batch], kv)
            inputs["use_cache"] = kv is not None
            with torch.inference_mode():
                h = last_position(self.adapter, inputs, apart)
            last = keep_last(last, len(rows), batch, h, apart)
        assert last is not None
        return last_logprobs(self.adapter, last, apart)

    def fingerprint(self) -> str:
        """The prompts, plus the token count, the refusal statistic (unless log-odds, the original one) and a
        dtype other than float32: each changes the trial values."""
        base = super().fingerprint()
        base = base if self.refusal_stat == "logodds" else f"{base}+{self.refusal_stat}"
        dtype = str(self.adapter.dtype).removeprefix("torch.")
        base = base if dtype == "float32" else f"{base}+{dtype}"
        base = base if not self.score_tokens else f"{base}+tokens{self.score_tokens}"
        return base if self.task is None else f"{base}+task:{self.task.name}:{self.task.fingerprint()}"

    def _verdicts(self, rows: list[int], kv) -> tuple[torch.Tensor, list[bool]]:
        """Harmful ``rows`` decoded for ``score_tokens`` greedy tokens: (next-token log-probs, refusal verdicts)."""
        from refusal_atlas.evaluation.completions import refusal_decided
        from refusal_atlas.evaluation.refusal import is_refusal
        from refusal_atlas.model.generation import greedy_generate, greedy_on_plan

        tok = self.chat.tokenizer
        if self.plan is None:
            gens = greedy_generate(self.adapter, self.chat, [self.rows[i] for i in rows], self.score_tokens,
                                   self.batch_size, fast=False)
            lp = self._logprobs(rows, None)
        else:
            gens, lp = [None] * len(rows), torch.empty(0)
            for batch in budget_batches([len(self.plan.suffixes[i]) for i in rows], self.batch_size):
                out = greedy_on_plan(self.adapter, self.plan, kv, [rows[j] for j in batch], self.score_tokens,
                                     stop_when=refusal_decided(tok), keep_first_logprobs=True)
                if not lp.numel():
                    lp = torch.empty(len(rows), out[0].first_logprobs.shape[-1], dtype=torch.float32)
                for j, g in zip(batch, out):
                    gens[j] = g
                    lp[j] = g.first_logprobs
        return lp, [is_refusal(tok.decode(g.token_ids, skip_special_tokens=True)) for g in gens]

    def _refusal_value(self, scores: list[float], verdicts: list[bool]) -> float:
        if not self.score_tokens:
            return refusal_statistic(scores, self.refusal_stat)
        mean = sum(scores) / len(scores)
        return sum(verdicts) / len(verdicts) + 0.5 / len(verdicts) * _sigmoid(mean)

    def baseline(self) -> dict[str, float]:
        """The unedited model's refusal number (this objective's statistic) and KL 0."""
        if self._base_refusal is None:
            nh = len(self.harmful)
            rows = list(range(nh))
            if self.score_tokens:
                lp, verdicts = self._verdicts(rows, self._prefix_kv())
            else:
                lp, verdicts = self._logprobs(rows, self._prefix_kv()), []
            self._base_refusal = self._refusal_value(refusal_score(lp, self.refusal_ids).tolist(), verdicts)
        if self.task is not None:
            base = self.task.baseline()
            return {"refusal": self._base_refusal, "kl": 0.0, "task": 0.0, "task_nll": base["nll"],
                    "task_accuracy": base["accuracy"], "task_n": base["n"]}
        return {"refusal": self._base_refusal, "kl": 0.0}

    def _prefix_kv(self):
        if self.plan is None:
            return None
        self.prefix_passes += 1
        return self.plan.prefix_kv()

    def _stage_values(self, rows: list[int], kv) -> tuple[list[float], list[bool], list[float]]:
        """(refusal log-odds and verdicts of the harmful rows, KL of the harmless rows) under the active edit."""
        nh = len(self.harmful)
        self._harmless_base()
        harm = [i for i in rows if i < nh]
        safe = [i for i in rows if i >= nh]
        refusal, verdicts, kl = [], [], []
        if self.score_tokens and harm:
            lp, verdicts = self._verdicts(harm, kv)
            safe_lp = self._logprobs(safe, kv) if safe else None
        else:  # both sets in one pass: fuller batches, one head matmul
            both = self._logprobs(harm + safe, kv)
            lp, safe_lp = both[:len(harm)], both[len(harm):]
        if harm:
            refusal = refusal_score(lp, self.refusal_ids).tolist()
        if safe:
            p, p_log_p = self._base_terms
            at = [i - nh for i in safe]
            kl = kl_against(p[at], p_log_p[at], safe_lp).tolist()
        return refusal, verdicts, kl

    def score(self, edit, prune: Callable[[tuple[float, ...]], int | None] | None = None) -> TrialScore:
        """Both stages under ``edit`` (an Edit, or a DirectionSet to ablate in subspace mode), stopping after
        the first if ``prune(partial)`` names a dominating trial."""
        spec = edit if hasattr(edit, "apply") else DirectionalAblation.from_directions(edit, "subspace")
        self._harmless_base()  # clean pass first, outside the edit
        if self.task is not None:
            self.task.baseline()  # also outside the edit
        refusal: list[float] = []
        verdicts: list[bool] = []
        kl: list[float] = []
        task = None
        with spec.apply(self.adapter):
            kv = self._prefix_kv()
            for stage, rows in enumerate(self.stages):
                if not rows:
                    continue
                r, v, k = self._stage_values(rows, kv)
                refusal, verdicts, kl = refusal + r, verdicts + v, kl + k
                if stage == 0:
                    partial: tuple[float, ...] = (self._refusal_value(refusal, verdicts), sum(kl) / len(kl))
                    if self.task is not None:
                        task = self.task.score()
                        partial = (*partial, task["loss"])
                    by = prune(partial) if prune is not None else None
                    if by is not None:
                        return TrialScore(partial, self.n1, None, by, task=task)
        stats = {stat: refusal_statistic(refusal, stat) for stat in REFUSAL_STATS}
        values = (self._refusal_value(refusal, verdicts), sum(kl) / len(kl), *partial[2:])
        return TrialScore(partial, self.n1, values, stats=stats, task=task)

    def __call__(self, directions) -> tuple[float, ...]:
        values = self.score(directions).values
        assert values is not None
        return values


def evaluate_staged(study, trial, objective: StagedObjective, edit, rule: PruneRule | None,
                    max_kl: float | None = None) -> tuple[float, ...]:
    """Score ``edit`` for ``trial``; record its first-stage values; raise TrialPruned if ``rule`` prunes it:
    dominated (see PruneRule), or, with a KL cap ``max_kl``, first-stage KL clearly above the cap (then the
    trial also records the cap's constraint, so TPE counts it infeasible)."""
    import optuna

    from refusal_atlas.search.study import KL_CONSTRAINT

    front = front_partials(study) if rule is not None else []

    def prune(partial: tuple[float, ...]) -> int | str | None:
        assert rule is not None
        if max_kl is not None and rule.over_cap(partial[1], max_kl):
            return MAX_KL
        return rule.dominating(partial, front)

    result = objective.score(edit, prune if rule is not None else None)
    trial.set_user_attr("partial", result.record())
    if result.stats is not None:
        trial.set_user_attr("refusal_stats", result.stats)
    if result.task is not None:
        trial.set_user_attr("capability", result.task)
    if result.values is None:
        trial.set_user_attr("pruned_by", result.pruned_by)
        if result.pruned_by == MAX_KL:
            trial.set_constraint(KL_CONSTRAINT, result.partial[1] - max_kl)
            raise optuna.TrialPruned(f"first-stage KL {result.partial[1]:.4f} clearly above the cap {max_kl}")
        raise optuna.TrialPruned(f"first-stage values {result.partial} dominated by trial #{result.pruned_by}")
    return result.values


def front_partials(study) -> list[tuple[int, tuple[float, ...]]]:
    """(trial number, first-stage values) of the current Pareto front's trials that recorded them."""
    from refusal_atlas.search.study import completed

    by_key = {t.user_attrs.get("key"): t.user_attrs["partial"] for t in completed(study) if "partial" in t.user_attrs}
    out = []
    for t in (study.best_trials if completed(study) else []):
        p = t.user_attrs.get("partial") or by_key.get(t.user_attrs.get("key"))
        if p is not None:
            out.append((t.number, (p["refusal"], p["kl"], *([p["task"]] if "task" in p else []))))
    return sorted(out)


def prune_identity(rule: PruneRule | None) -> dict[str, Any]:
    return {"prune": asdict(rule) if rule is not None else None}
