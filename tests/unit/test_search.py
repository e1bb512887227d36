"""Subset search: Lehmer space, seeding, resume after a crash (in-process and a killed subprocess),
Pareto front and pick rule, errors, and the search step on a tiny-model run directory."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from refusal_atlas.settings import load_settings
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.som import SomDirections
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.search.subsets import SubsetSpace, decode_lehmer, encode_lehmer, run_trials, subset_identity
from refusal_atlas.settings import SearchSettings
from refusal_atlas.search.study import choose_trial, completed, open_study, pareto_front, summarize
from refusal_atlas.search.storage import fail_stale_trials, study_lock


# --- search space ------------------------------------------------------------------------------------
def test_lehmer_codes_are_a_bijection_onto_ordered_distinct_subsets():
    ids = [0, 1, 2, 3, 4]
    space = [range(5 - i) for i in range(3)]
    subsets = [tuple(decode_lehmer(c, ids)) for c in itertools.product(*space)]
    assert len(subsets) == len(set(subsets)) == 5 * 4 * 3
    assert all(len(set(s)) == 3 for s in subsets)
    assert set(subsets) == set(itertools.permutations(ids, 3))
    for s in subsets:
        assert decode_lehmer(encode_lehmer(s, ids), ids) == list(s)
    with pytest.raises(ConfigError, match="out of range"):
        decode_lehmer([0, 4], ids)


@pytest.mark.parametrize("k, k_max, match", [(0, 0, "k must be >= 1"), (4, 4, "only 3 directions"),
                                             (2, 1, "k_max"), (2, 5, "only 3 directions")])
def test_subset_space_errors(k, k_max, match):
    with pytest.raises(ConfigError, match=match):
        SubsetSpace((0, 1, 2), k, k_max)


# --- a model-free objective for fast, exact checks ---------------------------------------------------------
def _directions(n: int = 8, d: int = 16) -> DirectionSet:
    return DirectionSet(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), layer=3, method="som")


def _objective(ds: DirectionSet) -> tuple[float, float]:
    """Deterministic trade-off: more 'strength' lowers refusal but raises KL."""
    strength = sum(float(v[0]) for v in ds.vectors)
    spread = sum(float(v[1]) ** 2 for v in ds.vectors)
    return -strength, 0.05 * spread + 0.01 * strength ** 2


def _how(k: int = 3, k_max: int | None = None, seed: int = 0, n_startup_trials: int = 10) -> dict:
    """A subset search: its space arguments and how it samples."""
    return {"space": (k, k_max), "seed": seed, "n_startup_trials": n_startup_trials}


def _run(study, directions: DirectionSet, objective, how: dict, n: int):
    return run_trials(study, directions, objective, SubsetSpace.of(directions, *how["space"]), seed=how["seed"],
                      n_startup_trials=how["n_startup_trials"], n_trials=n)


def _study(path: Path, how: dict, directions: DirectionSet):
    identity = subset_identity(SubsetSpace.of(directions, *how["space"]), directions, "synthetic", seed=how["seed"],
                               mode="subspace", n_startup_trials=how["n_startup_trials"])
    return open_study(path, "s", identity)


def _mem_study():
    """In-memory study (no SQLite commits) for the checks that do not need persistence."""
    return optuna.create_study(directions=["minimize", "minimize"])


def _ids(study) -> list[list[int]]:
    return [t.user_attrs["ids"] for t in completed(study)]


def test_same_seed_same_trials_other_seed_other_trials(tmp_path):
    ds = _directions()
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        settings = _how(k=3, seed=seed, n_startup_trials=4)
        study = _mem_study()
        _run(study, ds, _objective, settings, 12)
        runs[name] = [(t.user_attrs["ids"], t.values) for t in completed(study)]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    assert all(len(set(ids)) == 3 for ids, _ in runs["a"])


def test_resumed_search_equals_uninterrupted_one(tmp_path):
    ds = _directions()
    settings = _how(k=2, k_max=4, seed=5, n_startup_trials=3)
    straight = _mem_study()
    _run(straight, ds, _objective, settings, 10)

    study = _study(tmp_path / "crash.db", settings, ds)
    _run(study, ds, _objective, settings, 4)
    study.ask()  # a trial that a killed process never finished
    before = [(t.number, t.values) for t in completed(study)]
    reopened = _study(tmp_path / "crash.db", settings, ds)
    assert fail_stale_trials(reopened) == [4]
    _run(reopened, ds, _objective, settings, 6)
    assert [(t.number, t.values) for t in completed(reopened)][:4] == before
    assert len(completed(reopened)) == 10
    assert reopened.trials[4].state == TrialState.FAIL
    assert _ids(reopened) == _ids(straight)  # the crash changed nothing the sampler saw
    assert all(2 <= len(ids) <= 4 and len(set(ids)) == len(ids) for ids in _ids(reopened))


def test_repeated_subsets_reuse_values(tmp_path):
    ds = _directions(n=3)
    settings = _how(k=2, seed=0, n_startup_trials=2)
    study = _mem_study()
    calls = []
    _run(study, ds, lambda d: calls.append(d.ids) or _objective(d), settings, 12)
    keys = [tuple(sorted(ids)) for ids in _ids(study)]
    assert len(calls) == len(set(keys)) <= 3  # only 3 distinct unordered pairs exist
    for t in completed(study):
        if "reused_from" in t.user_attrs:
            assert t.values == study.trials[t.user_attrs["reused_from"]].values


# --- Pareto front and the pick rule ------------------------------------------------------------------
def _trial(number: int, refusal: float, kl: float):
    t = create_trial(values=[refusal, kl], params={"pick_0": number}, distributions={"pick_0": IntDistribution(0, 9)},
                     user_attrs={"ids": [number]})
    t.number = number
    return t


def test_choose_rule_lowest_refusal_under_kl_then_fallback():
    front = [_trial(0, -1.0, 0.01), _trial(1, -3.0, 0.08), _trial(2, -6.0, 0.4)]
    chosen, why = choose_trial(front, kl_threshold=0.1)
    assert chosen.number == 1 and "KL <= 0.1" in why
    chosen, why = choose_trial(front, kl_threshold=1.0)
    assert chosen.number == 2
    chosen, why = choose_trial(front, kl_threshold=0.001)
    assert chosen.number == 0 and why.startswith("fallback")


def test_pareto_front_and_summary(tmp_path):
    ds = _directions()
    settings = _how(k=2, seed=0, n_startup_trials=5)
    study = _mem_study()
    _run(study, ds, _objective, settings, 15)
    front = pareto_front(study)
    done = completed(study)
    for t in front:  # nothing dominates a front member
        assert not any(o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
                       for o in done)
    summary = json.loads(json.dumps(summarize(study, 0.2, settings)))
    assert summary["n_trials"]["complete"] == 15 and len(summary["trials"]) == 15
    assert summary["chosen"]["number"] in {t.number for t in front}
    assert summary["pareto_front"] == [t.number for t in front]
    assert {n for rec in summary["pareto"] for n in [rec["number"], *rec["duplicates"]]} == set(summary["pareto_front"])
    assert summary["rule"]["kl_threshold"] == 0.2


# --- errors ----------------------------------------------------------------------------------------------------
def test_empty_study_corrupt_file_mismatch_and_lock(tmp_path):
    ds = _directions()
    settings = _how(k=2)
    study = _study(tmp_path / "s.db", settings, ds)
    with pytest.raises(ArtifactError, match="no finished trials"):
        summarize(study, 0.1, settings)
    with pytest.raises(ConfigError, match="different settings.*seed"):
        _study(tmp_path / "s.db", _how(k=2, seed=9), ds)
    with pytest.raises(ArtifactError, match="no search study"):
        open_study(tmp_path / "missing.db", "s", create=False)
    (tmp_path / "bad.db").write_bytes(os.urandom(4096))
    with pytest.raises(ArtifactError, match="corrupt or unreadable study file"):
        open_study(tmp_path / "bad.db", "s")
    with study_lock(tmp_path / "s.db"):
        with pytest.raises(ConfigError, match="another search is running"):
            with study_lock(tmp_path / "s.db"):
                pass


# --- on a tiny model ---------------------------------------------------------------------------------------------
def test_validation_objective_on_tiny_model(tiny_run):
    _, ws, sets = tiny_run
    som = DirectionSet.load(ws.run.direction_path("som"))
    obj = ValidationObjective(ws.adapter, ws.chat, [p.instruction for p in sets.harmful_val],
                              [p.instruction for p in sets.harmless_val], ws.refusal_ids)
    base = obj.baseline()
    refusal, kl = obj(som.select(som.ids[:2]))
    assert kl > 0 and refusal != base["refusal"]
    assert obj(som.select(som.ids[:2])) == (refusal, kl)  # deterministic
    assert obj(som.select(som.ids[1::-1])) == pytest.approx((refusal, kl), abs=1e-6)  # subspace: order-free


def test_search_step_writes_artifacts_and_rejects_bad_k(tiny_run):
    from refusal_atlas.workflows.som import search_step

    _, ws, sets = tiny_run
    n = len(DirectionSet.load(ws.run.direction_path("som")))
    with pytest.raises(ConfigError, match=f"only {n} directions"):
        search_step(ws, sets, SearchSettings(k=n + 1, seed=11), trials=2)
    summary = search_step(ws, sets, SearchSettings(k=2, seed=12, n_startup_trials=2), trials=4)
    assert summary["n_trials"]["complete"] == 4
    best = DirectionSet.load(ws.run.direction_path("search_best"))
    assert best.ids == summary["chosen"]["ids"] and best.meta["search"]["trial"] == summary["chosen"]["number"]
    on_disk = json.loads((ws.run / "search.json").read_text())
    assert on_disk["chosen"] == summary["chosen"] and on_disk["baseline"]["refusal"] == summary["baseline"]["refusal"]
    again = search_step(ws, sets, SearchSettings(k=2, seed=12, n_startup_trials=2), until=3)  # already reached
    assert again["n_trials"]["complete"] == 4
    (ws.run / "study.db").unlink()


def test_killed_search_subprocess_resumes_without_losing_trials(tiny_run):
    """SIGKILL a `refusal-atlas search` mid-way, then resume: finished trials survive, totals add up."""
    from refusal_atlas.workflows.som import search_step

    root, ws, sets = tiny_run
    run_dir, db = root / "run", root / "run" / "study.db"
    db.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "refusal_atlas.cli", "search", "subsets", "-r", str(run_dir), "--k", "2", "--trials", "500",
           "--seed", "3", "--n-startup-trials", "2", "--no-evaluate"]
    proc = subprocess.Popen(cmd, env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def n_complete() -> int:
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return con.execute("SELECT count(*) FROM trials WHERE state='COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    deadline = time.time() + 120
    while n_complete() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]

    settings = SearchSettings(k=2, seed=3, n_startup_trials=2)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    killed = optuna.load_study(study_name="search-som", storage=storage)
    before = {t.number: (t.user_attrs["ids"], t.values) for t in completed(killed)}
    running = [t.number for t in killed.trials if t.state == TrialState.RUNNING]
    assert 2 <= len(before) < 500
    summary = search_step(ws, sets, settings, trials=3)
    after = optuna.load_study(study_name="search-som", storage=storage)
    now = {t.number: (t.user_attrs["ids"], t.values) for t in completed(after)}
    assert all(now[n] == v for n, v in before.items())
    assert len(now) == len(before) + 3 == summary["n_trials"]["complete"]
    assert summary["stale_trials_failed"] == running
    assert all(after.trials[n].state == TrialState.FAIL for n in running)


def test_run_method_som_end_to_end_and_resume(tiny_run, tmp_path):
    """`run --method som` on a tiny model: DIM pipeline, SOM, search, held-out comparison; resume tops up."""
    from refusal_atlas.workflows.som import run_som

    root, _, _ = tiny_run
    cfg = load_settings(None, dict(model=str(root / "model"), device="cpu", n_train=16, n_val=4, n_eval=4,
                                   max_new_tokens=2, filter_train=False, layer=2,
                                   search={"k": 2, "n_startup_trials": 2}))
    som = SomDirections(grid=(2, 3), iterations=500)
    ws, summary, comparison = run_som(cfg, tmp_path / "run", trials=3, builder=som)
    assert summary["n_trials"]["complete"] == 3
    assert ws.run.manifest()["status"] == "complete"
    ids = summary["chosen"]["ids"]
    records = [r for r in ws.run.metrics() if r.get("direction_ids") == ids and r["method"] == "som"]
    assert {r["dataset"] for r in records} == {"jailbreakbench", "harmless_test"}
    assert all(r["k"] == 2 for r in records) and any(r.get("kl") is not None for r in records)
    assert {"none", "ablate:dim"} <= {r["intervention"] for r in comparison["records"]}
    saved = json.loads((ws.run / "search.json").read_text())["heldout"]
    assert saved["direction_ids"] == ids and set(saved["winner"]) == {"jailbreakbench"}
    ws, summary, _ = run_som(cfg, tmp_path / "run", trials=5, builder=som, resume=True)
    assert summary["n_trials"]["complete"] == 5  # reached the target, did not add 5 more
