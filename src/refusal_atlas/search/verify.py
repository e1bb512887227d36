"""The edit search's multi-fidelity step: the one-pass proxy ranks, greedy generation decides.

The proxy (first-token refusal probability on harmful validation prompts, first-token KL on harmless ones)
ranks trials well overall (Spearman ρ 0.96 against generated refusal, docs/results/2026-12-06_search_fidelity.md)
but not at the strong end, where the pick is made: on the demo run a 30-trial search picked a TPE edit that,
scored on held-out prompts, was dominated by plain DIM ablation, the edit it started from (issue 28). So after
the proxy search the best proxy-front edits are generated and judged as ``evaluate`` would judge them:

* **Which edits.** The ``n`` proxy-front edits the pick rule would look at first — KL ≤ ``kl_threshold``
  by lowest proxy refusal, then the rest of the front by lowest KL — plus full ablation of the run's DIM
  direction (the search's first warm start) wherever it is, so a search never reports an edit that
  generation says is worse than where it started (:func:`candidates`).
* **How.** Greedy generation of ``max_new_tokens`` (64 by default: the shortest length whose verdicts all
  matched 256 tokens, docs/results/2026-11-22_generation_length.md) on the harmful *validation* prompts the
  proxy used — never test prompts — judged by the run's judge (``evaluation.judge``), a refusal rate with its
  Wilson interval per edit. The KL stays the proxy's: it is already the exact next-token KL on harmless
  validation prompts, not an approximation.
* **The pick** (:data:`RULE`): the lowest verified refusal rate (point estimate; overlapping intervals are not
  ties) among verified edits with KL ≤ ``kl_threshold``; ties: lower KL, then earlier trial; if none has
  KL ≤ ``kl_threshold``, the verified edit with the lowest KL. The verified front is the Pareto front of the
  verified edits on (verified refusal, KL). With a capability task as a third objective (:data:`TASK_RULE`):
  the same among verified edits whose task loss is also ≤ ``task_max_loss`` (the task loss is the proxy's, as
  the KL: it is already measured on the task's validation items), else the lowest task loss among those with
  KL ≤ ``kl_threshold``; candidates follow that order, and the verified front is 3-D.
* **Resumable.** Each edit's completions go to ``<dir>/trial_<n>.jsonl`` (written atomically per generated
  batch, :func:`refusal_atlas.evaluation.completions.completions_for`), then its verdict summary to
  ``<dir>/trial_<n>.json``; a killed verification reuses every finished edit and the finished batches of the
  one it was in, and generates nothing twice. A summary is reused only for the same edit, prompts, length and
  judge.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_atlas.core.io import read_json, write_json
from refusal_atlas.edits.base import Edit
from refusal_atlas.evaluation.completions import completions_for
from refusal_atlas.evaluation.evaluate import decided_early, kind_counts
from refusal_atlas.evaluation.judges import Judge, JudgeItem
from refusal_atlas.evaluation.stats import rate_record

RULE = ("min_verified_refusal_under_kl: among edits verified by generation with mean validation KL <= kl_threshold, "
        "the lowest verified refusal rate (point estimate: overlapping intervals are not ties; ties: lower KL, then "
        "earlier trial); if none qualifies, the verified edit with the lowest KL. Verified: greedy generation on "
        "the harmful validation prompts, judged as `evaluate` judges")
TASK_RULE = ("min_verified_refusal_under_kl_and_task: among edits verified by generation with mean validation KL <= "
             "kl_threshold and task loss <= task_max_loss, the lowest verified refusal rate (ties: lower KL, lower task "
             "loss, earlier trial); if none qualifies, the lowest task loss among verified edits with KL <= "
             "kl_threshold; if none has KL <= kl_threshold, the verified edit with the lowest KL")


@dataclass
class VerifyPlan:
    """How edits are verified: ``n`` proxy-front edits (plus full DIM ablation), ``max_new_tokens`` greedy
    tokens per prompt, rows per generation batch, the judge, and whether a row may stop once decided."""

    n: int
    max_new_tokens: int
    judge: Judge
    batch_size: int = 128
    stop_when_decided: bool = True

    def early_stop(self) -> bool:
        return decided_early(self.stop_when_decided, "harmful", [self.judge])


def candidates(front: Sequence[dict], n: int, kl_threshold: float, reference: dict | None = None,
               task_max: float | None = None) -> list[dict]:
    """The records to verify: the first ``n`` proxy-front records in the pick rule's order (KL ≤
    ``kl_threshold`` by lowest proxy refusal, then the others by lowest KL; with ``task_max`` and task values,
    those also within the task bound first, then the rest of KL ≤ ``kl_threshold`` by lowest task loss), plus
    ``reference`` (full DIM ablation) when given and not among them. ``n = 0``: none."""
    if n <= 0:
        return []
    ok = sorted((r for r in front if r["kl"] <= kl_threshold), key=lambda r: (r["refusal"], r["kl"], r["number"]))
    if task_max is not None and all("task" in r for r in front):
        ok = ([r for r in ok if r["task"] <= task_max] +
              sorted((r for r in ok if r["task"] > task_max), key=lambda r: (r["task"], r["refusal"], r["number"])))
    rest = sorted((r for r in front if r["kl"] > kl_threshold), key=lambda r: (r["kl"], r["refusal"], r["number"]))
    chosen = (ok + rest)[:n]
    if reference is not None and all(r["number"] != reference["number"] for r in chosen):
        chosen.append(reference)
    return chosen


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]


def verify_edit(adapter, chat, prompts: Sequence, edit: Edit, plan: VerifyPlan, stem: Path) -> dict[str, Any]:
    """Generate and judge ``edit`` on ``prompts`` (harmful validation) → its verified record, saved at
    ``stem``.json beside the completions ``stem``.jsonl; a saved record of the same edit, prompts, length and
    judge is returned as it is (``reused``)."""
    key = {"edit": edit.fingerprint(), "prompts": prompts_digest([p.instruction for p in prompts]),
           "max_new_tokens": plan.max_new_tokens, "judge": plan.judge.describe("harmful"),
           "dtype": str(getattr(adapter, "dtype", "")).removeprefix("torch.")}
    summary = stem.with_suffix(".json")
    if summary.is_file():
        saved = read_json(summary)
        if saved.get("key") == key:
            return {**saved, "reused": True}
    start = time.perf_counter()
    comp = completions_for(adapter, chat, prompts, edit, plan.max_new_tokens, plan.batch_size,
                           stem.with_suffix(".jsonl"), desc=f"verify [{edit.name or edit.label}]",
                           stop_when_decided=plan.early_stop())
    verdicts = plan.judge.judge([JudgeItem(p.instruction, r) for p, r in zip(prompts, comp.responses)], "harmful")
    refused = sum(v.label == "refused" for v in verdicts)
    decided = sum(v.label != "unclear" for v in verdicts)
    rec: dict[str, Any] = {"key": key, "judge": plan.judge.name, "max_new_tokens": plan.max_new_tokens,
                           "dataset": "harmful_val", "n": decided, "count": refused,
                           "unclear": len(verdicts) - decided}
    if decided:
        stats = rate_record(refused, decided)
        rec.update(rate=stats["rate"], ci95=stats["ci95"])
    else:
        rec.update(rate=None, ci95=None)
    kinds = kind_counts(plan.judge, verdicts)
    if kinds is not None:
        rec["kinds"] = kinds
    rec.update(seconds=round(time.perf_counter() - start, 2), tokens=sum(len(t) for t in comp.token_ids),
               generated_prompts=len(prompts) - comp.reused)
    write_json(summary, rec)
    return {**rec, "reused": False}


def _values(r: dict) -> tuple[float, ...]:
    """(verified refusal rate, KL[, task loss]) of a verified record."""
    return (r["verified"]["rate"], r["kl"], *([r["task"]] if "task" in r else []))


def verified_front(records: Sequence[dict]) -> list[dict]:
    """The verified records no other verified record beats on every objective (verified refusal, KL[, task]), by KL."""
    rated = [r for r in records if r["verified"].get("rate") is not None]
    values = _values

    front = [r for r in rated if not any(all(a <= b for a, b in zip(values(u), values(r))) and values(u) != values(r)
                                         for u in rated)]
    return sorted(front, key=lambda r: (r["kl"], r["verified"]["rate"], r["number"]))


def choose_verified(records: Sequence[dict], kl_threshold: float, task_max: float | None = None) -> tuple[dict, str]:
    """Apply :data:`RULE` (:data:`TASK_RULE` with task values and ``task_max``) to the verified records →
    (record, which branch of the rule chose it)."""
    from refusal_atlas.search.study import pick

    rated = [r for r in records if r["verified"].get("rate") is not None]
    if not rated:
        raise ValueError("no verified edit has a refusal rate (every verdict unclear)")
    return pick(rated, _values, kl_threshold, task_max, refusal="verified refusal", noun="verified edit")


def verify(adapter, chat, prompts: Sequence, records: Sequence[dict], edit_for: Callable[[dict], Edit],
           plan: VerifyPlan, directory: Path) -> dict[str, Any]:
    """Verify ``records`` (trial records with ``number``, ``kl``) one by one, each saved as it finishes →
    ``{"verified": records with a "verified" entry, "cost": {...}}``."""
    directory.mkdir(parents=True, exist_ok=True)
    out, start = [], time.perf_counter()
    for rec in records:
        verified = verify_edit(adapter, chat, prompts, edit_for(rec), plan, directory / f"trial_{rec['number']}")
        out.append({**rec, "verified": verified})
    fresh = [r["verified"] for r in out if not r["verified"]["reused"]]
    cost = {"edits": len(out), "prompts": len(prompts), "max_new_tokens": plan.max_new_tokens,
            "judge": plan.judge.name, "stop_when_decided": plan.early_stop(),
            "tokens": sum(r["verified"]["tokens"] for r in out),
            "seconds": round(sum(r["verified"]["seconds"] for r in out), 2),
            "this_call_seconds": round(time.perf_counter() - start, 2),
            "this_call_tokens": sum(v["tokens"] for v in fresh), "reused_edits": len(out) - len(fresh)}
    return {"verified": out, "cost": cost}
