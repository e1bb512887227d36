"""Distributed search on a real PostgreSQL server: two workers, one study, a SIGKILLed worker, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from postgres_server import postgres  # noqa: F401  (fixture)
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.settings import SearchSettings
from refusal_atlas.search.study import open_study, pareto_front
from refusal_atlas.search.storage import check_storage, make_storage

STUDY = "search-som"
ENV = {**os.environ, "REFUSAL_ATLAS_QUIET": "1", "REFUSAL_ATLAS_HEARTBEAT_S": "1", "REFUSAL_ATLAS_GRACE_S": "3"}


def _worker(run_dir, url, trials: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "refusal_atlas.cli", "search", "subsets", "-r", str(run_dir), "--storage", url,
           "--directions", "som", "--k", "2",
           "--trials", str(trials), "--seed", "3", "--n-startup-trials", "2", "--n-val", "4", "--no-evaluate"]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _trials(url):
    return optuna.load_study(study_name=STUDY, storage=make_storage(url)).get_trials(deepcopy=False)


def _kill_mid_trial(proc: subprocess.Popen, url: str, deadline: float) -> int:
    """SIGSTOP the worker while it owns a RUNNING trial, confirm it still does, SIGKILL → that trial's number."""
    name = f":{proc.pid}"
    while time.time() < deadline and proc.poll() is None:
        try:
            trials = _trials(url)
        except Exception:  # the study may not exist yet
            time.sleep(0.05)
            continue
        mine_done = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("worker", "").endswith(name)]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(name)
                   and "subset" in t.user_attrs]  # claimed: evaluating its subset
        if mine_done and running:
            os.kill(proc.pid, signal.SIGSTOP)
            still = [t for t in _trials(url) if t.number == running[0].number and t.state == TrialState.RUNNING]
            if still:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return still[0].number
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"worker never held a running trial: {proc.stderr.read().decode()[-2000:]}")


def test_two_workers_one_study_with_a_killed_worker(postgres, tiny_run, tmp_path):  # noqa: F811
    from refusal_atlas.workflows.som import search_step

    root, ws, sets = tiny_run
    url = postgres.create_database("two_workers")
    runs = [tmp_path / "w1", tmp_path / "w2"]  # each worker has its own copy of the run (as on two machines)
    for r in runs:
        shutil.copytree(root / "run", r, ignore=shutil.ignore_patterns("study.db*", "search.json"))
    a, b = _worker(runs[0], url, 8), _worker(runs[1], url, 200)
    killed = _kill_mid_trial(b, url, time.time() + 240)
    assert b.returncode == -signal.SIGKILL
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err.decode()[-3000:]

    # resume on w2's copy once the dead worker's heartbeat is older than the grace period
    time.sleep(4)
    from refusal_atlas.core.runtime import configure, restore
    from refusal_atlas.workflows.workspace import reopen_workspace

    ws2 = reopen_workspace(runs[1], {"n_val": 4})
    settings = SearchSettings(k=2, seed=3, n_startup_trials=2)
    previous = configure(heartbeat_s=1, grace_s=3)  # as REFUSAL_ATLAS_HEARTBEAT_S / _GRACE_S do for the CLI
    try:
        summary = search_step(ws2, sets, settings, trials=3, storage=url)
    finally:
        restore(previous)

    trials = _trials(url)
    by_number = {t.number: t for t in trials}
    # the killed worker's trial was failed by heartbeat (by whichever live worker found it stale) and retried
    assert by_number[killed].state == TrialState.FAIL
    assert all(by_number[n].state == TrialState.FAIL for n in summary["stale_trials_failed"])
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert by_number[killed].params and retries[0].params == by_number[killed].params
    assert retries[0].user_attrs["ids"] == by_number[killed].user_attrs["ids"]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # trials from both workers (and the resumer) are recorded
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in done}
    assert {str(a.pid), str(b.pid), str(os.getpid())} <= workers
    n_a, n_b, n_r = (sum(t.user_attrs["worker"].endswith(f":{pid}") for t in done) for pid in (a.pid, b.pid, os.getpid()))
    # --trials means "reach N completed trials in the study": worker a counts what b finished before it started
    assert n_r == 3 and 8 - n_b <= n_a <= 8 and len(done) == n_a + n_b + n_r
    # no edit evaluated twice: evaluated subsets are distinct; reused ones copy an evaluated trial's values
    evaluated = [t for t in done if "reused_from" not in t.user_attrs]
    keys = [tuple(sorted(t.user_attrs["ids"])) for t in evaluated]
    assert len(keys) == len(set(keys))
    for t in done:
        if "reused_from" in t.user_attrs:
            src = by_number[t.user_attrs["reused_from"]]
            assert tuple(sorted(src.user_attrs["ids"])) == tuple(sorted(t.user_attrs["ids"])) and src.values == t.values
    # the Pareto front is readable from either worker's run directory, and both see the same study
    identity = summary["identity"]
    fronts = [[t.number for t in pareto_front(open_study(url, STUDY, identity, create=False))] for _ in runs]
    assert fronts[0] == fronts[1] == summary["pareto_front"]
    a_summary = json.loads((runs[0] / "search.json").read_text())
    assert set(a_summary["pareto_front"]) <= {t.number for t in done}
    assert json.loads((runs[1] / "search.json").read_text())["pareto_front"] == summary["pareto_front"]


def test_storage_url_checks():
    assert check_storage("postgresql://u@h/db").startswith(("postgresql://", "postgresql+psycopg://"))
    with pytest.raises(ConfigError, match="not supported"):
        check_storage("mysql://u@h/db")


def test_cli_rejects_bad_storage_before_loading(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "search", "-r", str(tmp_path / "nope"),
                           "--storage", "redis://localhost/0"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --storage redis://... is not supported; use "
                                                "postgresql://user@host/db (or a SQLite file path, the default)"]
    assert not (tmp_path / "nope").exists()


def test_workers_starting_together_on_a_fresh_database(postgres):  # noqa: F811
    """Concurrent first connections race to create optuna's tables; every worker must still get the study."""
    from concurrent.futures import ThreadPoolExecutor

    url = postgres.create_database("fresh_race")

    def connect(_):
        return open_study(url, STUDY, {"seed": 0}).study_name

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(connect, range(6))) == [STUDY] * 6
    assert len(optuna.get_all_study_summaries(make_storage(url))) == 1
