"""Held-out evaluation: {datasets} × {interventions} × {judges}, damage metrics and benchmarks.

Every rate recorded carries its n, count and a 95% interval; every KL carries n and a bootstrap
interval. Generation happens once per (dataset, intervention, max_new_tokens) and is stored in
``R/completions``, each line keyed by the intervention's fingerprint (which covers the direction
file's contents), so another direction never reuses it; judges read those files, and model judges
cache their verdicts in ``R/judgements``, so adding a judge or re-running after a crash costs only
what is new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.data.registry import REGISTRY
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.evaluation.completions import completions_for
from refusal_atlas.evaluation.damage import continuation_kl, kl_records, next_token_kl, refusal_metric
from refusal_atlas.evaluation.judges import (FOUR_LABELS, Judge, JudgeItem, SubstringJudge, Verdict, judge_labels,
                                            verdict_name)
from refusal_atlas.evaluation.refusal import next_token_logprobs
from refusal_atlas.evaluation.stats import mean_record, rate_record
from refusal_atlas.edits import ActAdd, DirectionalAblation, Edit, NoEdit
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter


def dataset_role(name: str) -> str:
    """harmful / harmless / over_refusal for registered sets; user files count as harmful."""
    info = REGISTRY.get(name)
    return info.role if info is not None else "harmful"


def kind_counts(judge: Judge, verdicts: Sequence[Verdict]) -> dict[str, int] | None:
    """{refusal, deflection, compliance, broken: count} over the decided verdicts, for judges that tell the four
    labels apart (``judge_labels``); None for judges that only say refused/complied."""
    if judge_labels(judge) != FOUR_LABELS:
        return None
    decided = [v for v in verdicts if v.label != "unclear"]
    return {k: sum(verdict_name(v) == k for v in decided) for k in FOUR_LABELS}


def judged_record(intervention: Edit, dataset: str, role: str, judge: Judge,
                  verdicts: Sequence[Verdict], responses: Sequence[str], max_new_tokens: int) -> dict:
    """One metrics record: refusal-type rate over the items the judge decided, with n and a CI.

    A judge that tells the four labels apart also gives ``kinds`` (the four counts) and the deflection rate
    with its interval, beside the refusal rate and never folded into it."""
    refused = sum(v.label == "refused" for v in verdicts)
    complied = sum(v.label == "complied" for v in verdicts)
    n = refused + complied
    rec = {**intervention.describe(), "dataset": dataset, "role": role, **judge.describe(role),
           "metric": refusal_metric(role, intervention.kind)}
    if n:
        stats = rate_record(refused, n)
        rec.update(n=n, count=refused, rate=stats["rate"], refusal_rate=stats["rate"], ci95=stats["ci95"])
    else:
        rec.update(n=0, count=0, rate=None, refusal_rate=None, ci95=None)
    kinds = kind_counts(judge, verdicts)
    if kinds is not None:
        rec["kinds"] = kinds
        if n:
            deflected = rate_record(kinds["deflection"], n)
            rec.update(deflection_rate=deflected["rate"], deflection_ci95=deflected["ci95"])
    scores = [v.score for v in verdicts if v.label != "unclear" and v.score is not None]
    if n and len(scores) == n and rec.get("rubric") == "strongreject":
        m = mean_record(scores)
        rec.update(score_mean=m["mean"], score_ci95=m["ci95"])
    rec.update(unclear=len(verdicts) - n, empty_responses=sum(1 for r in responses if not r.strip()),
               max_new_tokens=max_new_tokens)
    return rec


def evaluate_refusal(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    prompts: Sequence[Prompt],
    dataset: str,
    intervention: Edit,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    completions_path: Path | None = None,
    stop_when_decided: bool = False,
    first_logprobs: list | None = None,
    backend=None,
    judge: Judge | None = None,
) -> dict:
    """Generate greedily under ``intervention`` (or reuse saved completions), judge by ``judge`` (default substring).

    ``stop_when_decided``: a row stops once a refusal phrase appears, which fixes its substring verdict
    (the same verdicts as full-length generation, tested; not for over-refusal sets' prefix rule, and only
    when the judge is the default substring judge: :func:`decided_early`).
    ``first_logprobs``: a list that receives the generation's first-step log-probs [N, V] (None when
    completions were reused or another backend generated), so a next-token KL needs no extra pass.
    ``backend``: another generation engine (e.g. vLLM); None generates with HF and the hooks.
    """
    judge, role = judge or SubstringJudge(), dataset_role(dataset)
    comp = completions_for(adapter, chat, prompts, intervention, max_new_tokens, batch_size, completions_path,
                           desc=f"generate {dataset} [{intervention.label}]",
                           stop_when_decided=decided_early(stop_when_decided, role, [judge]),
                           keep_first_logprobs=first_logprobs is not None, backend=backend)
    if first_logprobs is not None:
        first_logprobs.append(comp.first_logprobs)
    verdicts = judge.judge([JudgeItem(p.instruction, r) for p, r in zip(prompts, comp.responses)], role)
    return judged_record(intervention, dataset, role, judge, verdicts, comp.responses, max_new_tokens)


def evaluate_kl(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    prompts: Sequence[Prompt],
    intervention: Edit,
    base_logprobs=None,
    batch_size: int = 16,
    new_logprobs=None,
) -> tuple[float, object]:
    """Mean next-token KL(base ‖ intervened) over the prompts; returns (kl, base_logprobs) for reuse.

    ``new_logprobs``: the intervened log-probs if already known (e.g. from generation's first step).
    """
    instructions = [p.instruction for p in prompts]
    if base_logprobs is None:
        base_logprobs = (new_logprobs if intervention.kind == "none" and new_logprobs is not None
                         else next_token_logprobs(adapter, chat, instructions, batch_size=batch_size))
    if intervention.kind == "none":
        return 0.0, base_logprobs
    new = new_logprobs if new_logprobs is not None else next_token_logprobs(
        adapter, chat, instructions, batch_size=batch_size, intervention=intervention, desc=f"KL [{intervention.label}]")
    return float(next_token_kl(base_logprobs, new).mean()), base_logprobs


# ----------------------------------------------------------------------------------------------
@dataclass
class EvalPlan:
    """What ``evaluate_run`` does; the CLI builds one from its flags."""

    datasets: list[str]
    interventions: list[Edit]
    judges: list[Judge]
    n: int | None = 100
    max_new_tokens: int = 64
    kl_tokens: int = 16
    benchmarks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 16
    generation_batch_size: int | None = None  # rows per generation batch (None: batch_size); see settings.py
    seed: int = 0
    backend: object | None = None  # generation engine (None: HF with hooks; see generation_vllm)
    stop_when_decided: bool = False  # stop a row at its first refusal phrase (see early_stop)

    @property
    def gen_batch(self) -> int:
        return self.generation_batch_size or self.batch_size

    def early_stop(self, role: str) -> bool:
        """Whether rows of a ``role`` set may stop at their first refusal phrase (:func:`decided_early`)."""
        return decided_early(self.stop_when_decided, role, self.judges)


def decided_early(stop_when_decided: bool, role: str, judges: Sequence[Judge]) -> bool:
    """Whether generation may stop a row at its first refusal phrase: only when asked, when every judge is the
    default substring judge (whose verdict is then fixed; any other judge reads the whole answer) and not for
    over-refusal sets, which are judged by a prefix rule."""
    return (stop_when_decided and role != "over_refusal" and bool(judges)
            and all(type(j) is SubstringJudge and j.substrings == SubstringJudge().substrings for j in judges))


def check_interventions(names: Sequence[str]) -> list[tuple[str, float]]:
    """Parse intervention names → (kind, coeff); cheap, so the CLI runs it before loading a model."""
    out = []
    for name in names:
        kind, _, arg = name.partition(":")
        if kind not in ("none", "ablate", "actadd") or (arg and kind != "actadd"):
            raise ConfigError(f"unknown intervention {name!r}; use none, ablate, actadd or actadd:<coeff>")
        try:
            out.append((kind, float(arg) if arg else 1.0))
        except ValueError:
            raise ConfigError(f"bad ActAdd coefficient in {name!r}") from None
    if not out:
        raise ConfigError("no interventions given")
    return out


def parse_interventions(names: Sequence[str], directions, mode: str = "subspace") -> list[Edit]:
    """``none``, ``ablate``, ``actadd`` (+1 × the direction: induce refusal) or ``actadd:<coeff>``."""
    out = []
    for name, (kind, coeff) in zip(names, check_interventions(names)):
        if kind != "none" and directions is None:
            raise ArtifactError(f"intervention {name!r} needs a direction file in the run directory "
                                "(run `refusal-atlas run` or `select` first)")
        if kind == "none":
            out.append(NoEdit())
        elif kind == "ablate":
            out.append(DirectionalAblation.from_directions(directions, mode))  # type: ignore[arg-type]
        else:
            out.append(ActAdd.from_directions(directions, coeff))
    return out


def evaluate_run(adapter: ModelAdapter, chat: ChatFormatter, run: RunDir, plan: EvalPlan,
                 model_name: str = "model") -> list[dict]:
    """Run ``plan`` with the model of ``adapter``; completions are kept in ``run`` and records are added to
    its metrics.json as each group finishes (benchmark records name the model ``model_name``)."""
    if plan.kl_tokens < 1 or plan.max_new_tokens < 1:
        raise ConfigError("max_new_tokens and kl_tokens must be >= 1")
    prompt_sets = {name: load_prompts(name, n=plan.n, seed=plan.seed) for name in plan.datasets}  # fail early
    records: list[dict] = []
    for name, prompts in prompt_sets.items():
        role = dataset_role(name)
        group = []
        for spec in plan.interventions:
            comp = completions_for(adapter, chat, prompts, spec, plan.max_new_tokens, plan.gen_batch,
                                   run.completions_path(name, spec.label), desc=f"generate {name} [{spec.label}]",
                                   stop_when_decided=plan.early_stop(role), backend=plan.backend)
            items = [JudgeItem(p.instruction, r) for p, r in zip(prompts, comp.responses)]
            for judge in plan.judges:
                rec = judged_record(spec, name, role, judge, judge.judge(items, role), comp.responses,
                                    plan.max_new_tokens)
                rec["reused_completions"] = comp.reused
                group.append(rec)
        if role == "harmless":
            group += _damage(adapter, chat, run, plan, name, prompts)
        run.add_metrics(group)
        records += group
    for spec in plan.interventions if plan.benchmarks else []:
        from refusal_atlas.evaluation.benchmarks import run_benchmarks

        recs = run_benchmarks(adapter.model, chat.tokenizer, plan.benchmarks, adapter=adapter,
                              intervention=spec, limit=plan.limit, batch_size=plan.batch_size)
        recs = [{**spec.describe(), **r, "model": model_name} for r in recs]
        run.add_metrics(recs)
        records += recs
    return records


def _damage(adapter: ModelAdapter, chat: ChatFormatter, run: RunDir, plan: EvalPlan, dataset: str,
            prompts: list[Prompt]) -> list[dict]:
    """First-token and n-token KL(clean ‖ intervened) on a harmless set, per intervention."""
    specs = [s for s in plan.interventions if s.kind != "none"]
    if not specs:
        return []
    clean = NoEdit()
    length = max(plan.max_new_tokens, plan.kl_tokens)  # reuse the clean completions when long enough
    comp = completions_for(adapter, chat, prompts, clean, length, plan.gen_batch,
                           run.completions_path(dataset, clean.label), desc=f"generate {dataset} [none]",
                           backend=plan.backend)
    conts = [ids[: plan.kl_tokens] for ids in comp.token_ids]  # greedy: a prefix is the shorter continuation
    out = []
    for spec in specs:
        kl = continuation_kl(adapter, chat, [p.instruction for p in prompts], conts, spec,
                             batch_size=max(1, plan.batch_size // 2), desc=f"KL {dataset} [{spec.label}]")
        for rec in kl_records(kl, plan.kl_tokens):
            out.append({**spec.describe(), "dataset": dataset, "role": "harmless", "judge": None, **rec})
    return out


def format_records(records: Sequence[dict]) -> str:
    """A fixed-width table of any metrics records (rates, KLs, benchmark scores); every rate names its judge and
    generation length (``tokens``), and judges that tell deflection apart get a deflection column beside it."""
    cols = ("dataset", "intervention", "judge", "metric")
    width = {c: max([len(c)] + [len(str(r.get(c) or "-")) for r in records]) for c in cols}
    deflect = any("deflection_rate" in r for r in records)
    header = (" ".join(f"{c:<{width[c]}}" for c in cols) + f" {'tokens':>6} {'n':>4} {'value':>7}  {'95% CI':<16}"
              + ("  deflection [95% CI]" if deflect else ""))
    lines = [header, "-" * (len(header) + 4)]
    for r in records:
        value, ci, is_rate = r.get("rate", r.get("kl")), r.get("ci95"), "rate" in r
        val_s = "-" if not isinstance(value, (int, float)) else f"{value:.3f}" if is_rate else f"{value:.3g}"
        ci_s = "-" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]" if is_rate else f"[{ci[0]:.3g}, {ci[1]:.3g}]"
        tokens = r.get("max_new_tokens") if is_rate and "judge" in r and r.get("judge") else None
        extra = "".join(f"  {k}={r[k]}" for k in ("unclear", "empty_responses") if r.get(k))
        cells = " ".join(f"{str(r.get(c) or '-'):<{width[c]}}" for c in cols)
        line = f"{cells} {tokens or '-':>6} {r.get('n', 0):>4} {val_s:>7}  {ci_s:<16}"
        if deflect:
            line += f"  {format_deflection(r):<20}"
        lines.append(line.rstrip() + extra)
    return "\n".join(lines)


RESOLVING_TOKENS = 64  # the shortest length whose verdicts all matched 256 tokens (docs/results/2026-11-22_generation_length.md)


def length_note(records: Sequence[dict]) -> str | None:
    """A note when some judged rate was generated at fewer than :data:`RESOLVING_TOKENS` tokens, else None."""
    short = sorted({r["max_new_tokens"] for r in records if "refusal_rate" in r and r.get("judge")
                    and isinstance(r.get("max_new_tokens"), int) and r["max_new_tokens"] < RESOLVING_TOKENS})
    if not short:
        return None
    return (f"note: rates at {', '.join(map(str, short))} new tokens can under-read refusal; {RESOLVING_TOKENS} is the "
            f"shortest length whose verdicts matched 256 tokens (docs/evaluation.md): --max-new-tokens "
            f"{RESOLVING_TOKENS} re-reads them")


def format_deflection(rec: dict) -> str:
    """``0.12 [0.07, 0.20]`` for a record whose judge told deflections apart, ``-`` otherwise."""
    rate, ci = rec.get("deflection_rate"), rec.get("deflection_ci95")
    return "-" if rate is None or not ci else f"{rate:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
