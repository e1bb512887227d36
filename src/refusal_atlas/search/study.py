"""Seeded, resumable multi-objective Optuna studies: storage, the ask/tell loop, the Pareto front and the pick.

:func:`run_loop` is shared by the edit search (:mod:`refusal_atlas.search.edit_space`, run-dir step in
:mod:`refusal_atlas.workflows.search`) and by the SOM paper's subset search (:mod:`refusal_atlas.search.subsets`).

* **Objectives** (all minimised, one forward pass each): a refusal number on harmful *validation*
  prompts under the edit, and the mean next-token KL on harmless validation prompts against cached
  unmodified log-probs; an edit search may add a third, a capability task's loss on its validation items
  (``--objective refusal,kl,TASK``, :mod:`refusal_atlas.evaluation.capability`). Test splits and
  benchmarks are never touched here.
* **Reproducible and resumable.** The study lives in SQLite (or PostgreSQL for many workers). Before each
  trial the TPE sampler is re-seeded from (seed, number of finished = completed or pruned trials), and TPE
  only learns from those, so a search that was killed and resumed proposes exactly what an uninterrupted
  one would have. Trials left RUNNING by a crash are marked FAIL when the search reopens (a lock file
  guarantees no other process owns them).
* **Result.** The Pareto front of (refusal, KL[, task]) plus one chosen trial by a documented rule
  (:data:`RULE`; with a task, :data:`TASK_RULE`): the lowest refusal among Pareto trials with KL ≤
  ``kl_threshold`` (and task loss ≤ ``task_max_loss``); if none qualifies, the lowest KL (with a task: first
  the lowest task loss among those with KL ≤ ``kl_threshold``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from refusal_atlas.core.crashpoints import crash_point
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.core.progress import progress
from refusal_atlas.search.storage import coordinator_for, is_server_url, make_storage

KL_CONSTRAINT = "kl_above_max"  # with a KL cap: each trial's Optuna constraint KL − max_kl (feasible when <= 0)


RULE = ("min_refusal_under_kl: among Pareto-optimal trials with mean validation KL <= kl_threshold, the "
        "lowest mean validation refusal score (ties: lower KL, then earlier trial); if none qualifies, "
        "the Pareto trial with the lowest KL")
TASK_RULE = ("min_refusal_under_kl_and_task: among Pareto-optimal trials (refusal, KL, task loss) with mean validation "
             "KL <= kl_threshold and task loss <= task_max_loss, the lowest mean validation refusal score (ties: lower "
             "KL, lower task loss, earlier trial); if none qualifies, the lowest task loss among those with KL <= "
             "kl_threshold; if none has KL <= kl_threshold, the Pareto trial with the lowest KL")
CORE = ("refusal", "kl")


def open_study(db_path: str | os.PathLike, name: str, identity: dict[str, Any] | None = None,
               create: bool = True, objectives: Sequence[str] | None = CORE) -> optuna.Study:
    """Open (or create) the study ``name`` of ``objectives`` (all minimised) in the SQLite file or PostgreSQL URL
    ``db_path``; ``objectives=None`` opens a study of any number of objectives (readers).

    ``identity`` (search space, seed, objective fingerprint) is stored with a new study and must
    match on reopening; a mismatch is an error rather than a silently mixed study, and so is a study
    of another number of objectives.
    """
    db_path = db_path if is_server_url(db_path) else Path(db_path)
    if not create and isinstance(db_path, Path) and not db_path.is_file():
        raise ArtifactError(f"no search study at {db_path}; run `refusal-atlas search` first")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = make_storage(db_path)  # SQLite file, or a PostgreSQL server with heartbeats (search/storage.py)
        names = [s.study_name for s in storage.get_all_studies()]
        if name not in names and not create:
            raise ArtifactError(f"{db_path} holds no study named {name!r} (studies: {names})")
        study = optuna.create_study(storage=storage, study_name=name,
                                    directions=["minimize"] * len(objectives or CORE), load_if_exists=True)
    except (ArtifactError, ConfigError):
        raise
    except Exception as exc:  # sqlalchemy / optuna storage errors: the file is not a usable study
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"corrupt or unreadable study file {db_path}: {msg}") from None
    if objectives is not None and len(study.directions) != len(objectives):
        stored = (study.user_attrs.get("identity") or {}).get("objectives", list(CORE))
        raise ConfigError(_count_mismatch(name, db_path, stored, objectives))
    if identity is not None:
        stored = study.user_attrs.get("identity")
        if stored is None:
            study.set_user_attr("identity", identity)
        else:
            diff = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
            if diff:
                raise ConfigError(
                    f"{db_path} holds a study made with different settings ({', '.join(diff)}: "
                    f"{ {k: stored.get(k) for k in diff} } vs now { {k: identity.get(k) for k in diff} }); "
                    "use the same settings to resume, or another run directory")
    return study


def check_objectives_match(db_path: str | os.PathLike, name: str, objectives: Sequence[str]) -> None:
    """Before any model loads: a ConfigError if the SQLite file ``db_path`` already holds study ``name`` with
    another number of objectives (the full check, identity included, is :func:`open_study`'s). Nothing for a
    server URL or a missing file."""
    if is_server_url(db_path) or not Path(db_path).is_file():
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(db_path))
    except Exception:  # no such study, or an unreadable file: open_study says which, later
        return
    if len(study.directions) != len(objectives):
        stored = (study.user_attrs.get("identity") or {}).get("objectives", list(CORE))
        raise ConfigError(_count_mismatch(name, db_path, stored, objectives))


def _count_mismatch(name: str, db_path, stored: Sequence[str], objectives: Sequence[str]) -> str:
    return (f"study {name!r} in {db_path} has {len(stored)} objectives ({','.join(stored)}), this search has "
            f"{len(objectives)} ({','.join(objectives)}); resume it with --objective {','.join(stored)}, or search "
            "in another run directory")


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """Completed and pruned trials: what a trial budget counts and what re-seeds the sampler."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _sampler(seed: int, n_complete: int, group: bool, n_startup_trials: int,
             worker: tuple[int, ...] = ()) -> optuna.samplers.TPESampler:
    trial_seed = int(np.random.SeedSequence([seed, n_complete, *worker]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(multivariate=True, group=group, seed=trial_seed,
                                          n_startup_trials=n_startup_trials)


def run_loop(study: optuna.Study, propose: Callable[[Trial], tuple[str, Callable[[], tuple[float, ...]]]],
             *, seed: int, n_startup_trials: int, group: bool, n_trials: int, deadline: float | None = None,
             desc: str = "search trials", max_kl: float | None = None) -> list[FrozenTrial]:
    """The seeded ask/tell loop every search uses; returns the trials this call finished.

    ``propose(trial)`` suggests parameters (and sets user attributes) and returns (key, evaluate);
    ``evaluate`` may raise ``optuna.TrialPruned`` to record the trial PRUNED (it is not re-used).
    Every trial records its ``origin``: ``anchor`` (an enqueued warm start, which says so itself), ``random``
    (TPE's start-up phase: fewer than ``n_startup_trials`` finished trials, sampled uniformly) or ``tpe``.
    A key already evaluated in this study is not re-run: its values are copied (objectives are
    deterministic) and the trial records ``reused_from``; it still goes through ask/tell, so it
    has its own start and end time. ``deadline`` (a ``time.monotonic()`` value) stops the loop
    before a trial that would start after it. ``max_kl`` caps the KL objective: every trial records the
    constraint KL − max_kl, so TPE counts trials above the cap as infeasible and the front leaves them out.
    ``evaluate`` returns one value per objective of the study (refusal and KL first).
    """
    coord = coordinator_for(study)  # several workers on a PostgreSQL study: seeds, heartbeats, claims
    done: dict[str, FrozenTrial] = {t.user_attrs["key"]: t for t in completed(study) if "key" in t.user_attrs}
    told: list[FrozenTrial] = []
    bar = progress(None if deadline is not None and n_trials >= 10**6 else n_trials, desc)  # a time budget: no total
    try:
        for _ in range(n_trials):
            if deadline is not None and time.monotonic() >= deadline:
                break
            coord.before_ask(study)
            n_finished = len(finished(study))
            study.sampler = _sampler(seed, n_finished, group, n_startup_trials, coord.seed_parts)
            trial = study.ask()
            try:
                if "origin" not in trial.user_attrs:  # enqueued warm starts say "anchor" themselves
                    trial.set_user_attr("origin", "random" if n_finished < n_startup_trials else "tpe")
                with coord.alive(study, trial):
                    key, evaluate = propose(trial)
                    trial.set_user_attr("key", key)
                    previous = coord.previous(study, trial, key, done)
                    if previous is not None:
                        trial.set_user_attr("reused_from", previous.number)
                        values = tuple(previous.values)
                    else:
                        values = evaluate()
                    if max_kl is not None:
                        trial.set_constraint(KL_CONSTRAINT, values[1] - max_kl)
            except optuna.TrialPruned:  # evaluate() stopped early (search.trial): kept, never on the front
                study.tell(trial, state=TrialState.PRUNED)
                bar.update(1)
                crash_point("trial")
                continue
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            frozen = study.tell(trial, list(values))
            done.setdefault(key, frozen)
            told.append(frozen)
            bar.update(1)
            bar.set_postfix(refusal=f"{values[0]:.2f}", kl=f"{values[1]:.3f}")
            crash_point("trial")
    finally:
        bar.close()
    return told


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials no other completed trial beats on every objective (refusal, KL[, task]); under a KL cap, only trials
    within it (Optuna's feasible trials), unless none is: then all completed trials, so a search whose
    every trial overshot the cap still reports what it found (summarize says so)."""
    done = completed(study)
    if not done:
        raise ArtifactError(f"the search study {study.study_name!r} has no finished trials yet; "
                            "run `refusal-atlas search --trials N`")
    front = study.best_trials or [t for t in done if not any(
        all(a <= b for a, b in zip(u.values, t.values)) and u.values != t.values for u in done)]
    return sorted(front, key=lambda t: (t.values[1], t.values[0], *t.values[2:], t.number))


def pick(points: Sequence[Any], values: Callable[[Any], Sequence[float]], kl_threshold: float,
         task_max: float | None = None, refusal: str = "refusal", noun: str = "Pareto trial") -> tuple[Any, str]:
    """:data:`RULE` (or, when ``task_max`` is given and points have a task value, :data:`TASK_RULE`) on ``points``
    whose ``values(point)`` are (refusal, KL[, task]) → (point, which branch chose it, in words naming
    ``refusal`` and ``noun``); ties: ``values``' order, then the point's ``number``. Shared by the proxy pick and
    the verified pick (search/verify.py)."""
    def num(p: Any) -> int:
        return p["number"] if isinstance(p, dict) else p.number

    ok = [p for p in points if values(p)[1] <= kl_threshold]
    if task_max is not None and points and len(values(points[0])) > 2:
        within = [p for p in ok if values(p)[2] <= task_max]
        if within:
            best = min(within, key=lambda p: (*values(p), num(p)))
            return best, f"lowest {refusal} with KL <= {kl_threshold} and task loss <= {task_max}"
        if ok:
            best = min(ok, key=lambda p: (values(p)[2], values(p)[0], values(p)[1], num(p)))
            return best, f"fallback: none with KL <= {kl_threshold} has task loss <= {task_max}; lowest task loss"
    elif ok:
        return min(ok, key=lambda p: (*values(p)[:2], num(p))), f"lowest {refusal} with KL <= {kl_threshold}"
    best = min(points, key=lambda p: (values(p)[1], values(p)[0], *values(p)[2:], num(p)))
    return best, f"fallback: no {noun} has KL <= {kl_threshold}; lowest KL"


def choose_trial(front: Sequence[FrozenTrial], kl_threshold: float,
                 task_max: float | None = None) -> tuple[FrozenTrial, str]:
    """Apply :data:`RULE` (:data:`TASK_RULE` with a task objective and ``task_max``) → (trial, which branch of
    the rule chose it)."""
    if not front:
        raise ArtifactError("the Pareto front is empty: no finished trials")
    return pick(front, lambda t: t.values, kl_threshold, task_max)


def trial_origin(t: FrozenTrial) -> str:
    """Where a trial's parameters came from: ``anchor`` (a warm start), ``random`` (TPE's start-up) or ``tpe``
    (``unknown`` for trials of studies made before origins were recorded that were not enqueued)."""
    return t.user_attrs.get("origin") or ("anchor" if "fixed_params" in t.system_attrs else "unknown")


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    rec: dict[str, Any] = {"number": t.number, "state": t.state.name, "origin": trial_origin(t),
                           "ids": t.user_attrs.get("ids"), "params": dict(t.params)}
    if t.values is not None:
        rec["refusal"], rec["kl"] = t.values[:2]
        if len(t.values) > 2:
            rec["task"] = t.values[2]
    for attr in ("reused_from", "choice", "edit", "partial", "pruned_by", "capability"):
        if attr in t.user_attrs:
            rec[attr] = t.user_attrs[attr]
    if t.datetime_start is not None:
        rec["start"] = t.datetime_start.isoformat()
    if t.datetime_complete is not None:
        rec["end"] = t.datetime_complete.isoformat()
    return rec


def subset_key(ids: Sequence[int], mode: str) -> tuple[int, ...]:
    return tuple(sorted(ids)) if mode == "subspace" else tuple(ids)  # subspace ablation is order-free


def trial_key(t: FrozenTrial, mode: str) -> str:
    """What makes two trials the same edit (stored by :func:`run_loop`; older subset trials: their ids)."""
    return t.user_attrs.get("key") or repr(subset_key(t.user_attrs.get("ids", []), mode))


def _dedupe(trials: Sequence[FrozenTrial], mode: str) -> list[dict[str, Any]]:
    """One record per distinct subset (re-proposed subsets list their trial numbers as duplicates)."""
    out: dict[str, dict[str, Any]] = {}
    for t in trials:
        key = trial_key(t, mode)
        if key in out:
            out[key]["duplicates"].append(t.number)
        else:
            out[key] = {**trial_record(t), "duplicates": []}
    return list(out.values())


def summarize(study: optuna.Study, kl_threshold: float, settings: dict[str, Any],
              mode: str = "subspace", task_max: float | None = None) -> dict[str, Any]:
    """Everything search.json records: all trials, the Pareto front, the rule and the chosen trial.

    ``kl_threshold``: the pick rule's KL bound; ``settings``: what the search ran with, recorded as is;
    ``mode``: a subset search's ablation mode (which subsets are the same edit); ``task_max``: with a task
    objective, the pick rule's bound on the task loss.
    """
    front = pareto_front(study)
    chosen, branch = choose_trial(front, kl_threshold, task_max)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                         TrialState.FAIL, TrialState.RUNNING,
                                                                         TrialState.WAITING)}
    counts["distinct_subsets"] = len({trial_key(t, mode) for t in trials if t.state == TrialState.COMPLETE})
    counts["above_max_kl"] = sum(t.constraints.get(KL_CONSTRAINT, 0.0) > 0 for t in trials)
    objectives = {"refusal": "mean logit refusal score on harmful validation prompts under the edit "
                             "(log-odds of a refusal-start token; lower = less refusal)",
                  "kl": "mean next-token KL(unmodified || ablated) on harmless validation prompts"}
    rule = {"name": "min_refusal_under_kl", "kl_threshold": kl_threshold, "description": RULE}
    if len(study.directions) > 2:
        task = ((study.user_attrs.get("identity") or {}).get("objectives") or [None] * 3)[2]
        objectives["task"] = (f"task {task}: increase of the mean NLL of the correct choice over the unedited model "
                              "on the task's validation items (nats; accuracy in each trial's capability record)")
        rule = {"name": "min_refusal_under_kl_and_task", "kl_threshold": kl_threshold, "task_max_loss": task_max,
                "description": TASK_RULE}
    return {
        "study": study.study_name, "settings": settings, "identity": study.user_attrs.get("identity"),
        "objectives": objectives,
        "n_trials": counts, "baseline": study.user_attrs.get("baseline"),
        "reference": study.user_attrs.get("reference"),
        "rule": rule,
        "chosen": {**trial_record(chosen), "why": branch},
        "pareto_front": [t.number for t in front],
        "pareto": _dedupe(front, mode),
        "trials": [trial_record(t) for t in trials if t.state != TrialState.WAITING],  # waiting: queued anchors
    }
