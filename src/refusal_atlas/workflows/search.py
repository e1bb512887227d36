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
from dataclasses import asdict, dataclass, field
from typing import Any

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.search.sources import EditContext
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import write_json
from refusal_atlas.search.study import finished, open_study, summarize
from refusal_atlas.search.storage import release_stale_trials, study_guard
from refusal_atlas.search.edit_space import EditSpace, build_edit, context_fingerprint, describe_choice, run_edit_trials
from refusal_atlas.search.trial import PruneRule, StagedObjective, prune_identity, check_refusal_stat
from refusal_atlas.workflows.som import record_references
from refusal_atlas.workflows.workspace import PromptSets, Workspace


@dataclass
class EditSearchSettings:
    """Seed, TPE start-up, the pick rule's KL bound, which DirectionSets join the DIM sources, and k_max."""

    seed: int = 0
    kl_threshold: float = 0.1
    n_startup_trials: int = 10
    sets: tuple[str, ...] = ()
    k_max: int | None = None
    prune: PruneRule | None = field(default_factory=PruneRule)  # None: score every trial on every prompt
    score_tokens: int = 0  # > 0: refusal = substring rate of that many greedy tokens (search.trial)
    refusal_stat: str = "probability"  # mean first-token refusal probability, or "logodds" (search.trial)
    # a KL cap: edits above it are off the front, and TPE learns to avoid them (an Optuna constraint); with
    # pruning, a trial whose first-stage KL is clearly above it stops there. None: no cap
    max_kl: float | None = None
    # trials 0, 1, ...: ablation of the selected DIM direction at these strengths (1 = full ablation, the
    # run's own edit). Weaker ones lay a first front from end to end: on the embedded model KL grows about
    # as strength² and refusals fall about linearly (bench/vs_heretic.py, 2026-12-02, heretic's evaluator:
    # 1 → 14/100 at KL 0.076, 0.5 → 20 at 0.016, 0.25 → 31 at 0.0037, 0.12 → 38 at 0.0008), and TPE
    # alone finds few low-damage points early on.
    anchors: tuple[float, ...] = (1.0, 0.85, 0.7, 0.5, 0.25, 0.12)

    def __post_init__(self) -> None:
        check_refusal_stat(self.refusal_stat)
        if self.max_kl is not None and not self.max_kl > 0:
            raise ConfigError(f"max_kl must be > 0, got {self.max_kl}")
        if self.prune == PruneRule():  # the default rule: its refusal margin in this statistic's units
            self.prune = PruneRule.for_statistic(self.refusal_stat)


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
            som_step(ws.run, SomDirections(seed=ws.cfg.seed))


def edit_search_step(ws: Workspace, sets: PromptSets, settings: EditSearchSettings, trials: int | None = None,
                     until: int | None = None, minutes: float | None = None,
                     storage: str | None = None) -> dict[str, Any]:
    """Add ``trials``, or reach ``until`` finished (complete or pruned) trials, or search for ``minutes`` → edits/, search_edits.json.

    ``storage``: a PostgreSQL URL shared by several workers (see search/storage.py); default ``R/study.db``.
    """
    if sum(x is not None for x in (trials, until, minutes)) != 1:
        raise ConfigError("give exactly one of trials (add N), until (reach N) or minutes")
    if any(x is not None and x < 0 for x in (trials, until, minutes)):
        raise ConfigError("the search budget must be >= 0")
    ensure_sets(ws, settings.sets)
    ctx = EditContext.from_run(ws.run.path, list(settings.sets))
    space = EditSpace.for_context(ctx, settings.k_max)
    objective = StagedObjective(ws.adapter, ws.chat, [p.instruction for p in sets.harmful_val],
                                [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                                batch_size=ws.cfg.batch_size, fraction=(settings.prune or PruneRule()).fraction,
                                score_tokens=settings.score_tokens, refusal_stat=settings.refusal_stat)
    identity = {**space.identity(), "seed": settings.seed, "n_startup_trials": settings.n_startup_trials,
                "directions": context_fingerprint(ctx), "objective": objective.fingerprint(),
                **prune_identity(settings.prune), **({"max_kl": settings.max_kl} if settings.max_kl is not None else {})}
    db = storage or ws.run / "study.db"
    name = "search-edits" + "".join(f"+{s}" for s in settings.sets)
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
                for strength in settings.anchors:
                    try:
                        study.enqueue_trial(space.full_ablation_params(layer, strength))
                    except ConfigError:
                        pass  # the DIM layer lies outside the direction-index range: no warm start
            with ws.timed("search_edits"):
                run_edit_trials(study, space, ctx, objective, settings.seed, settings.n_startup_trials, n_new,
                                deadline, prune=settings.prune, max_kl=settings.max_kl)
        summary = summarize(study, settings)
    summary.update(space=asdict(space), stale_trials_failed=stale, settings=asdict(settings))
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
