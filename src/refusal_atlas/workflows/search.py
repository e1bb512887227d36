"""The edit search on a finished run directory: the default `refusal-atlas search` job.

Reads the run's DIM candidates and harmless means (and any DirectionSets asked for, building SOM
directions with default settings if ``som`` is asked for and missing), searches the edit space of
:mod:`refusal_atlas.search.edit_space` with the seeded, resumable loop of :mod:`refusal_atlas.search`
on the validation prompts, then verifies the best proxy-front edits by generation
(:mod:`refusal_atlas.search.verify`; ``search.verify`` edits, 0: off) and saves what it found as edits:
``edits/search_best`` (the pick rule's trial: by the verified numbers, or by the proxy when verification is
off) and ``edits/search_trial_<n>`` for every Pareto or verified trial, so `evaluate --edit` and `export
--edit` use exactly the evaluated edit. Writes ``search_edits.json`` (all trials with their origin and start
and end times, the proxy front, the verified edits and front, the rule, the verification's cost).

**Objectives.** Refusal and KL; ``search.objectives`` = (refusal, kl, TASK) adds a capability task's loss
(:mod:`refusal_atlas.evaluation.capability`), a three-dimensional front, and a pick rule that also bounds the task
loss by ``search.task_max_loss`` (:data:`refusal_atlas.search.study.TASK_RULE`, verified:
:data:`refusal_atlas.search.verify.TASK_RULE`).

**Default budget: 30 trials.** Trials 0–5 are the warm starts (``search.anchors``: full ablation of the run's
DIM pick, then the same edit ever weaker down to strength 0.12, so the front starts from both of its ends),
TPE samples uniformly until ``n_startup_trials`` = 10 trials have finished (trials 6–9), and trials 10–29 —
two thirds of the budget — are proposed by TPE. Fewer trials leave TPE little or nothing to do (8 trials
return the anchors and two random points; the printed ``origin`` column says so). The verification's cost is
printed beside the front; how it compares with the 30 proxy trials on 2 CPU cores has not been measured yet.
The count was not tuned on any test prompt.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.search.sources import EditContext
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import write_json
from refusal_atlas.search.study import finished, open_study, summarize
from refusal_atlas.search.storage import release_stale_trials, study_guard
from refusal_atlas.search.edit_space import EditSpace, build_edit, context_fingerprint, describe_choice, run_edit_trials
from refusal_atlas.search.trial import PruneRule, StagedObjective, check_refusal_stat, prune_identity
from refusal_atlas.evaluation.capability import capability_task, parse_objectives
from refusal_atlas.settings import SearchSettings
from refusal_atlas.workflows.som import record_references
from refusal_atlas.workflows.workspace import PromptSets, Workspace


def prune_rule(search: SearchSettings) -> PruneRule | None:
    """The edit search's pruning rule (its refusal margin in the search's statistic), None when off."""
    return PruneRule.for_statistic(check_refusal_stat(search.refusal_stat)) if search.prune else None


def check_sets(run_dir, names: tuple[str, ...], k_max: int | None) -> None:
    """Cheap checks before any model loads: each set exists (``som`` may be built), fits the run's model
    (d_model, layer range) and has at least ``k_max`` directions."""
    from refusal_atlas.core.rundir import RunDir

    run = RunDir(run_dir)
    model = run.manifest().get("model", {})
    if k_max is not None and not 1 <= k_max <= 7:
        raise ConfigError(f"--k-max must be in 1..7, got {k_max}")
    for name in names:
        path = run.direction_path(name)
        if not path.exists():
            if name == "som":
                continue
            raise ConfigError(f"no direction set {name!r} in {run.path} (directions/{name}.safetensors); "
                              "build it first (e.g. `refusal-atlas directions rdo`)")
        ds = DirectionSet.load(path)
        n_layers, d_model = model.get("n_layers"), model.get("d_model")
        if (d_model is not None and ds.d_model != d_model) or (n_layers is not None and not 0 <= ds.layer < n_layers):
            raise ConfigError(f"direction set {name!r} (d_model {ds.d_model}, layer {ds.layer}) does not fit this "
                              f"run's model (d_model {d_model}, {n_layers} layers): it comes from another model")
        if k_max is not None and k_max > len(ds):
            raise ConfigError(f"k_max = {k_max} but the direction set {name!r} has only {len(ds)} directions; "
                              "lower --k-max")


def ensure_sets(ws: Workspace, names: tuple[str, ...]) -> None:
    """Build SOM directions (defaults, at the DIM layer) if asked for and missing; other sets must exist."""
    from refusal_atlas.directions.som import SomDirections
    from refusal_atlas.workflows.som import som_step

    for name in names:
        if ws.run.direction_path(name).exists():
            continue
        check_sets(ws.run.path, (name,), None)  # raises for anything but a missing SOM
        with ws.timed("som"):
            som_step(ws.run, SomDirections(seed=ws.settings.data.seed))


def edit_study_name(sets: tuple[str, ...]) -> str:
    """The study an edit search with these added direction sets lives in."""
    return "search-edits" + "".join(f"+{s}" for s in sets)


def edit_search_step(ws: Workspace, sets: PromptSets, search: SearchSettings, trials: int | None = None,
                     until: int | None = None, minutes: float | None = None,
                     storage: str | None = None) -> dict[str, Any]:
    """Add ``trials``, or reach ``until`` finished (complete or pruned) trials, or search for ``minutes`` → edits/, search_edits.json.

    What is searched: the DIM sources plus ``search.sets``, scored as ``search`` says (statistic, pruning,
    KL cap), warm-started at ``search.anchors``, picked by the run's ``kl_threshold``.
    ``storage``: a PostgreSQL URL shared by several workers (see search/storage.py); default ``R/study.db``.
    """
    if sum(x is not None for x in (trials, until, minutes)) != 1:
        raise ConfigError("give exactly one of trials (add N), until (reach N) or minutes")
    if any(x is not None and x < 0 for x in (trials, until, minutes)):
        raise ConfigError("the search budget must be >= 0")
    if search.max_kl is not None and not search.max_kl > 0:
        raise ConfigError(f"max_kl must be > 0, got {search.max_kl}")
    prune, kl_threshold = prune_rule(search), ws.settings.selection.kl_threshold
    seed = ws.settings.data.seed if search.seed is None else search.seed
    objectives = parse_objectives(search.objectives)
    ensure_sets(ws, search.sets)
    ctx = EditContext.from_run(ws.run.path, list(search.sets))
    space = EditSpace.for_context(ctx, search.k_max, search.transforms, router=search.router)
    task = (capability_task(objectives[2], ws.adapter, ws.chat, n=search.task_n, seed=seed,
                            batch_size=ws.settings.model.batch_size) if len(objectives) > 2 else None)
    task_max = search.task_max_loss if task is not None else None
    objective = StagedObjective(ws.adapter, ws.chat, [p.instruction for p in sets.harmful_val],
                                [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                                batch_size=ws.settings.model.batch_size, fraction=(prune or PruneRule()).fraction,
                                score_tokens=search.score_tokens, refusal_stat=search.refusal_stat, task=task)
    identity = {**space.identity(), "seed": seed, "n_startup_trials": search.n_startup_trials,
                "directions": context_fingerprint(ctx), "objective": objective.fingerprint(),
                **prune_identity(prune), **({"max_kl": search.max_kl} if search.max_kl is not None else {}),
                **({"objectives": list(objectives)} if task is not None else {})}  # two-objective identities as before
    db = storage or ws.run / "study.db"
    name = edit_study_name(search.sets)
    with study_guard(db):
        study = open_study(db, name, identity, objectives=objectives)
        stale = release_stale_trials(study, db)
        n_new = (trials if trials is not None else
                 max(0, until - len(finished(study))) if until is not None else 10**9)  # type: ignore[operator]
        deadline = time.monotonic() + 60 * minutes if minutes is not None else None
        if n_new > 0 and (minutes is None or minutes > 0):
            record_references(study, ws, objective)
            dim_path = ws.run.direction_path("dim")
            if not study.trials and dim_path.exists():  # warm start: the DIM pick at each anchor strength
                layer = DirectionSet.load(dim_path).layer
                for strength in search.anchors:
                    try:
                        study.enqueue_trial(space.full_ablation_params(layer, strength), user_attrs={"origin": "anchor"})
                    except ConfigError:
                        pass  # the DIM layer lies outside the direction-index range: no warm start
            with ws.timed("search_edits"):
                run_edit_trials(study, space, ctx, objective, seed, search.n_startup_trials, n_new,
                                deadline, prune=prune, max_kl=search.max_kl)
        recorded = {"seed": seed, "kl_threshold": kl_threshold, "n_startup_trials": search.n_startup_trials,
                    "sets": list(search.sets), "k_max": search.k_max, "prune": asdict(prune) if prune else None,
                    "score_tokens": search.score_tokens, "refusal_stat": search.refusal_stat,
                    "max_kl": search.max_kl, "anchors": list(search.anchors), "transforms": list(search.transforms),
                    **({"router": True} if search.router else {}),
                    "verify": search.verify, "verify_tokens": search.verify_tokens,
                    **({"objectives": list(objectives), "task_n": search.task_n, "task_max_loss": task_max}
                       if task is not None else {})}
        summary = summarize(study, kl_threshold, recorded, task_max=task_max)
        summary.update(space=asdict(space), stale_trials_failed=stale)
        if search.verify > 0:
            reference = _dim_trial(summary, space, ws)
            with ws.timed("search_verify"):
                verify_step(ws, sets, search, summary, ctx, name, reference, kl_threshold, task_max)
    saved: dict[int, str] = {}
    for rec in [*summary["pareto"], *summary.get("verified", [])]:  # every front or verified trial as an edit
        if rec["number"] not in saved:
            edit = build_edit(rec["choice"], ctx, name=f"search_trial_{rec['number']}")
            edit.save(ws.run / "edits" / edit.name)
            saved[rec["number"]] = edit.name
        rec["edit_name"] = saved[rec["number"]]
    chosen = summary["chosen"]
    best = build_edit(chosen["choice"], ctx, name="search_best")
    best.meta["search"] = {"trial": chosen["number"], "origin": chosen["origin"], "refusal": chosen["refusal"],
                           "kl": chosen["kl"], **({"task": chosen["task"]} if "task" in chosen else {}),
                           "rule": summary["rule"]["name"], "study": name,
                           **({"verified": {k: chosen["verified"][k] for k in ("rate", "ci95", "n", "count", "judge",
                                                                              "max_new_tokens")}}
                              if "verified" in chosen else {})}
    best.save(ws.run / "edits" / "search_best")
    chosen["edit_fingerprint"] = best.fingerprint()
    write_json(ws.run / "search_edits.json", summary)
    return summary


def _dim_trial(summary: dict[str, Any], space: EditSpace, ws: Workspace) -> dict[str, Any] | None:
    """The completed trial that is full ablation of the run's DIM pick (the first warm start), if any."""
    dim_path = ws.run.direction_path("dim")
    if not dim_path.exists():
        return None
    try:
        choice = space.decode(space.full_ablation_params(DirectionSet.load(dim_path).layer))
    except ConfigError:
        return None  # the DIM layer lies outside the direction-index range
    return next((t for t in summary["trials"] if t["state"] == "COMPLETE" and t.get("choice") == choice), None)


def verify_step(ws: Workspace, sets: PromptSets, search: SearchSettings, summary: dict[str, Any], ctx: EditContext,
                study_name: str, reference: dict[str, Any] | None, kl_threshold: float,
                task_max: float | None = None) -> None:
    """Verify the best ``search.verify`` proxy-front edits (and full DIM ablation) by generation on the harmful
    validation prompts and re-pick by :data:`refusal_atlas.search.verify.RULE`; updates ``summary`` in place
    (``verified``, ``verified_front``, ``verification``, ``chosen``, ``rule``; the proxy pick and rule stay as
    ``proxy_chosen``, ``proxy_rule``). Per-edit completions and verdicts: ``R/search_verify/<study>/trial_<n>.json[l]``
    (a search in another dtype: ``<study>+<dtype>``). With a task objective, ``task_max`` bounds the task loss
    (:data:`refusal_atlas.search.verify.TASK_RULE`)."""
    from refusal_atlas.evaluation.judges.base import safe_name
    from refusal_atlas.search.verify import (RULE, TASK_RULE, VerifyPlan, candidates, choose_verified, verified_front,
                                             verify)

    ev, dtype = ws.settings.evaluation, str(ws.adapter.dtype).removeprefix("torch.")  # a --dtype search: its own files
    plan = VerifyPlan(search.verify, search.verify_tokens, ws.judge(search.judge), ev.generation_batch_size,
                      ev.stop_when_decided)
    todo = candidates(summary["pareto"], plan.n, kl_threshold, reference, task_max)
    result = verify(ws.adapter, ws.chat, sets.harmful_val, todo,
                    lambda rec: build_edit(rec["choice"], ctx, name=f"search_trial_{rec['number']}"),
                    plan, ws.run / "search_verify" / safe_name(study_name + ("" if dtype == "float32" else f"+{dtype}")))
    records = result["verified"]
    chosen, branch = choose_verified(records, kl_threshold, task_max)
    summary["proxy_chosen"], summary["proxy_rule"] = summary["chosen"], summary["rule"]
    summary["rule"] = ({"name": "min_verified_refusal_under_kl", "kl_threshold": kl_threshold, "description": RULE}
                       if task_max is None else
                       {"name": "min_verified_refusal_under_kl_and_task", "kl_threshold": kl_threshold,
                        "task_max_loss": task_max, "description": TASK_RULE})
    summary["chosen"] = {**chosen, "why": branch}
    summary["verified"] = records
    summary["verified_front"] = [r["number"] for r in verified_front(records)]
    summary["verification"] = {**result["cost"], "dataset": "harmful_val",
                               "reference_trial": reference["number"] if reference else None}
    on_front = set(summary["pareto_front"])
    for rec in records:
        rec["on_proxy_front"] = rec["number"] in on_front


def _verified_cell(v: dict[str, Any] | None) -> str:
    if not v or v.get("rate") is None:
        return "-"
    return f"{v['rate']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] {v['count']}/{v['n']}"


def format_edit_search(summary: dict[str, Any]) -> str:
    """The front as a table: origin, proxy refusal, KL, the verified refusal rate (when verified), the edit;
    plus baseline and DIM, the pick and the verification's cost."""
    n, chosen = summary["n_trials"], summary["chosen"]
    verified = {r["number"]: r for r in summary.get("verified", [])}
    vfront = set(summary.get("verified_front", []))
    pfront = set(summary["pareto_front"])
    rows = {t["number"]: t for t in summary["pareto"]}
    rows.update({k: v for k, v in verified.items() if k not in rows})
    ordered = sorted(rows.values(), key=lambda t: (t["kl"], t["refusal"], t["number"]))
    m = (summary.get("settings") or {}).get("score_tokens")
    stat = (summary.get("settings") or {}).get("refusal_stat", "logodds")
    what = (f"substring rate of {m} greedy tokens + logit tie-break" if m else
            "mean first-token refusal probability" if stat == "probability" else "mean logit refusal score")
    cap = (summary.get("settings") or {}).get("max_kl")
    capped = "" if cap is None else (
        f"; {n.get('above_max_kl', 0)} above the KL cap {cap}" + ("" if any(t["kl"] <= cap for t in summary["pareto"])
                                                                 else " (all of them: the front ignores the cap)"))
    cost = summary.get("verification")
    lines = [f"trials: {n['complete']} complete, {n.get('pruned', 0)} pruned, {n['fail']} failed{capped}; "
             f"validation prompts (proxy = {what}; KL = next-token KL on harmless; lower = less refusal):"]
    has_task = "task" in summary.get("objectives", {})
    base = summary.get("baseline") or {}
    if has_task:
        task_name = ((summary.get("settings") or {}).get("objectives") or ["", "", "?"])[2]
        acc = f", unedited accuracy {base['task_accuracy']:.3f}" if "task_accuracy" in base else ""
        lines.append(f"task = {task_name}: increase of the mean NLL of the correct choice on "
                     f"{base.get('task_n', '?')} of its validation items (nats{acc}; acc = accuracy under the edit)")
    if cost:
        lines.append(f"verified = refusal rate of {cost['max_new_tokens']} greedy tokens on the {cost['prompts']} "
                     f"harmful validation prompts, {cost['judge']} judge, 95% Wilson interval, refusals/n; "
                     "front: P proxy Pareto front, V verified Pareto front")
    vhead = f"  {'verified [95% CI]':<29}" if cost else ""
    thead = f"{'task':>9}{'acc':>7}" if has_task else ""
    lines += [f"  {'trial':<7}{'origin':<8}{'front':<6}{'proxy':>8}{'KL':>9}{thead}{vhead}  {'saved as':<22}edit",
              f"  {'-' * ((110 if cost else 90) + (16 if has_task else 0))}"]
    for t in ordered:
        mark = ("P" if t["number"] in pfront else "") + ("V" if t["number"] in vfront else "")
        cell = f"  {_verified_cell((verified.get(t['number']) or {}).get('verified')):<29}" if cost else ""
        star = "*" if t["number"] == chosen["number"] else " "
        tcell = f"{t['task']:>9.4f}{(t.get('capability') or {}).get('accuracy', float('nan')):>7.3f}" if has_task else ""
        lines.append(f" {star}#{t['number']:<6}{t.get('origin', '?'):<8}{mark or '-':<6}{t['refusal']:>8.3f}"
                     f"{t['kl']:>9.4f}{tcell}{cell}  {t.get('edit_name', '-'):<22}{describe_choice(t['choice'])}")
    blank = f"  {'-':<29}" if cost else ""
    if summary.get("baseline"):
        tcell = f"{0.0:>9.4f}{base.get('task_accuracy', float('nan')):>7.3f}" if has_task else ""
        lines.append(f"  {'none':<7}{'':<14}{base['refusal']:>8.3f}{0.0:>9.4f}{tcell}{blank}  {'-':<22}(no edit)")
    dim = (summary.get("reference") or {}).get("dim")
    if dim:
        ref = (summary.get("verification") or {}).get("reference_trial")
        note = f" = trial #{ref}" if ref is not None else ""
        tcell = f"{dim.get('task', float('nan')):>9.4f}{'':>7}" if has_task else ""
        lines.append(f"  {'DIM':<7}{'':<14}{dim['refusal']:>8.3f}{dim['kl']:>9.4f}{tcell}{blank}  {'-':<22}"
                     f"(full ablation of the selected DIM direction{note})")
    lines.append(f"chosen: *trial #{chosen['number']} ({chosen.get('origin', '?')}; {chosen['why']}) "
                 "→ edits/search_best.json")
    proxy = summary.get("proxy_chosen")
    if proxy is not None and proxy["number"] != chosen["number"]:
        lines.append(f"  (the proxy alone would have picked trial #{proxy['number']}: proxy {proxy['refusal']:.3f} "
                     f"at KL {proxy['kl']:.4f})")
    if cost:
        lines.append(f"verification: {cost['edits']} edits × {cost['prompts']} prompts × ≤{cost['max_new_tokens']} "
                     f"tokens ({cost['tokens']} generated, {cost['judge']} judge"
                     + (", rows stop at a refusal phrase" if cost.get("stop_when_decided") else "")
                     + f"): {cost['seconds']:.0f} s"
                     + (f"; {cost['reused_edits']} edits reused from search_verify/, {cost['this_call_seconds']:.0f} s "
                        "in this call" if cost.get("reused_edits") else ""))
    origins = {t.get("origin") for t in summary.get("trials", []) if t.get("state") == "COMPLETE"}
    if "tpe" not in origins:
        lines.append(f"note: no trial was proposed by TPE (it starts once {(summary.get('settings') or {}).get('n_startup_trials')} "
                     "trials have finished, anchors included): the front holds warm starts and random points only; "
                     "search with more trials (default 30)")
    return "\n".join(lines)
