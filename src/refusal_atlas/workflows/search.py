"""The edit search on a finished run directory: the default `refusal-atlas search` job.

Reads the run's DIM candidates and harmless means (and any DirectionSets asked for, building SOM
directions with default settings if ``som`` is asked for and missing), searches the edit space of
:mod:`refusal_atlas.search.edit_space` with the seeded, resumable loop of :mod:`refusal_atlas.search`
on the validation prompts, and saves what it found as edits: ``edits/search_best`` (the pick rule's
trial) and ``edits/search_trial_<n>`` for every Pareto trial (trial 0 is full ablation of the run's DIM
pick and the next ones the same edit ever weaker, down to strength 0.12, so the front starts from
both of its ends), so `evaluate --edit` and `export --edit` use exactly the evaluated edit. Writes ``search_edits.json`` (all trials with their start and
end times, the front, the rule).
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
    ensure_sets(ws, search.sets)
    ctx = EditContext.from_run(ws.run.path, list(search.sets))
    space = EditSpace.for_context(ctx, search.k_max, search.transforms)
    objective = StagedObjective(ws.adapter, ws.chat, [p.instruction for p in sets.harmful_val],
                                [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                                batch_size=ws.settings.model.batch_size, fraction=(prune or PruneRule()).fraction,
                                score_tokens=search.score_tokens, refusal_stat=search.refusal_stat)
    identity = {**space.identity(), "seed": seed, "n_startup_trials": search.n_startup_trials,
                "directions": context_fingerprint(ctx), "objective": objective.fingerprint(),
                **prune_identity(prune), **({"max_kl": search.max_kl} if search.max_kl is not None else {})}
    db = storage or ws.run / "study.db"
    name = "search-edits" + "".join(f"+{s}" for s in search.sets)
    with study_guard(db):
        study = open_study(db, name, identity)
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
                        study.enqueue_trial(space.full_ablation_params(layer, strength))
                    except ConfigError:
                        pass  # the DIM layer lies outside the direction-index range: no warm start
            with ws.timed("search_edits"):
                run_edit_trials(study, space, ctx, objective, seed, search.n_startup_trials, n_new,
                                deadline, prune=prune, max_kl=search.max_kl)
        recorded = {"seed": seed, "kl_threshold": kl_threshold, "n_startup_trials": search.n_startup_trials,
                    "sets": list(search.sets), "k_max": search.k_max, "prune": asdict(prune) if prune else None,
                    "score_tokens": search.score_tokens, "refusal_stat": search.refusal_stat,
                    "max_kl": search.max_kl, "anchors": list(search.anchors), "transforms": list(search.transforms)}
        summary = summarize(study, kl_threshold, recorded)
    summary.update(space=asdict(space), stale_trials_failed=stale)
    for rec in summary["pareto"]:
        edit = build_edit(rec["choice"], ctx, name=f"search_trial_{rec['number']}")
        edit.save(ws.run / "edits" / edit.name)
        rec["edit_name"] = edit.name
    best = build_edit(summary["chosen"]["choice"], ctx, name="search_best")
    best.meta["search"] = {"trial": summary["chosen"]["number"], "refusal": summary["chosen"]["refusal"],
                           "kl": summary["chosen"]["kl"], "rule": summary["rule"]["name"], "study": name}
    best.save(ws.run / "edits" / "search_best")
    summary["chosen"]["edit_fingerprint"] = best.fingerprint()
    write_json(ws.run / "search_edits.json", summary)
    return summary


def format_edit_search(summary: dict[str, Any]) -> str:
    """The Pareto front as a table (validation refusal score, KL, the edit), plus baseline and DIM."""
    n, chosen = summary["n_trials"], summary["chosen"]
    rows = [(f"#{t['number']}", t["refusal"], t["kl"], t.get("edit_name", "-"), describe_choice(t["choice"]))
            for t in summary["pareto"]]
    if summary.get("baseline"):
        rows.append(("none", summary["baseline"]["refusal"], 0.0, "-", "(no edit)"))
    dim = (summary.get("reference") or {}).get("dim")
    if dim:
        rows.append(("DIM", dim["refusal"], dim["kl"], "-", "(full ablation of the selected DIM direction)"))
    m = (summary.get("settings") or {}).get("score_tokens")
    stat = (summary.get("settings") or {}).get("refusal_stat", "logodds")
    what = (f"substring rate of {m} greedy tokens + logit tie-break" if m else
            "mean first-token refusal probability" if stat == "probability" else "mean logit refusal score")
    cap = (summary.get("settings") or {}).get("max_kl")
    capped = "" if cap is None else (
        f"; {n.get('above_max_kl', 0)} above the KL cap {cap}" + ("" if any(t["kl"] <= cap for t in summary["pareto"])
                                                                 else " (all of them: the front ignores the cap)"))
    lines = [f"trials: {n['complete']} complete, {n.get('pruned', 0)} pruned, {n['fail']} failed{capped}; Pareto front on "
             f"validation prompts (refusal = {what}, lower = less refusal; KL = next-token KL on harmless):",
             f"  {'trial':<7}{'refusal':>9}{'KL':>9}  {'saved as':<22}edit", f"  {'-' * 90}"]
    lines += [f"  {a:<7}{r:>9.3f}{k:>9.4f}  {name:<22}{what}" for a, r, k, name, what in rows]
    lines.append(f"chosen: trial #{chosen['number']} ({chosen['why']}) → edits/search_best.json")
    return "\n".join(lines)

