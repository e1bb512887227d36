"""Where a search study lives: a SQLite file (one host, one process) or a PostgreSQL server (many workers).

* **SQLite** (the default, ``R/study.db``): one search process at a time, enforced by an fcntl
  lock beside the file; under the lock any RUNNING trial was left by a dead process.
* **PostgreSQL** (``--storage postgresql://user@host/db``): any number of workers on any number of
  machines share one study. A lock file means nothing across hosts, so liveness comes from
  heartbeats instead: each worker records one every ``heartbeat_s`` seconds while it owns a
  trial; a RUNNING trial silent for ``grace_s`` seconds is failed by the next worker that
  asks for a trial, and re-queued with the same parameters (up to :data:`MAX_RETRY` times). Both are
  runtime settings (core/runtime.py; ``REFUSAL_ATLAS_HEARTBEAT_S`` / ``REFUSAL_ATLAS_GRACE_S``, seconds).

Workers must not evaluate the same edit twice. Each worker folds its own id into the sampler seed
(so two workers that see the same history propose different subsets), and before evaluating a
subset a worker *claims* it under a PostgreSQL advisory lock: if another trial already finished
the subset its values are copied (``reused_from``); if one is evaluating it, the worker waits for
that trial and copies its values, or takes over if it dies.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.runtime import runtime

MAX_RETRY = 2
POLL_S = 0.5
SCHEMES = ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")


def is_server_url(target: str | os.PathLike) -> bool:
    return isinstance(target, str) and "://" in target


def check_storage(target: str | os.PathLike) -> str | Path:
    """Validate ``--storage`` (cheap, before any model loads) → a SQLAlchemy URL or a SQLite path."""
    if not is_server_url(target):
        return Path(target)
    scheme = str(target).split("://", 1)[0]
    if scheme not in SCHEMES:
        raise ConfigError(f"--storage {scheme}://... is not supported; use postgresql://user@host/db "
                          "(or a SQLite file path, the default)")
    if scheme == "postgresql":  # SQLAlchemy's default driver is psycopg2; use psycopg 3 when that is what we have
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None:
            if importlib.util.find_spec("psycopg") is None:
                raise ConfigError("--storage postgresql:// needs a driver: pip install 'refusal-atlas[postgres]'")
            target = "postgresql+psycopg://" + str(target).split("://", 1)[1]
    return str(target)


def make_storage(target: str | os.PathLike) -> optuna.storages.RDBStorage:
    """SQLite file → plain RDBStorage; PostgreSQL URL → RDBStorage with heartbeats and retry of dead trials."""
    checked = check_storage(target)
    if isinstance(checked, Path):
        return optuna.storages.RDBStorage(f"sqlite:///{checked}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 5
            retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)}
        else:
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)}
        for attempt in range(5):  # workers started together race to create optuna's tables: retry the losers
            try:
                return optuna.storages.RDBStorage(
                    checked, engine_kwargs={"pool_pre_ping": True}, **retry,
                    heartbeat_interval=runtime().heartbeat_s, grace_period=runtime().grace_s)
            except Exception as exc:
                from sqlalchemy.exc import IntegrityError, ProgrammingError

                if not isinstance(exc, (IntegrityError, ProgrammingError)) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


@contextmanager
def study_lock(db_path: Path) -> Iterator[None]:
    """Exclusive lock beside the study: under it, any RUNNING trial was left by a dead process."""
    lock_path = db_path.with_name(db_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another search is running on {db_path} (locked)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials (left by a killed process) FAIL; returns their numbers."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return [t.number for t in stale]


def study_guard(target: str | os.PathLike):
    """The single-process lock for a SQLite study; nothing for a server (heartbeats take over)."""
    return nullcontext() if is_server_url(target) else study_lock(Path(target))


def release_stale_trials(study: optuna.Study, target: str | os.PathLike) -> list[int]:
    """SQLite under its lock: every RUNNING trial is stale. Server: only those whose heartbeat stopped."""
    if not is_server_url(target):
        return fail_stale_trials(study)
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    _fail_stale(study)
    return sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)


# --- coordination of workers inside the trial loop -----------------------------------------------------
# ask/tell with heartbeats is what we want (we record them ourselves); optuna warns it expects optimize()
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _backend(study: optuna.Study):
    storage = study._storage
    return getattr(storage, "_backend", storage)


def _is_shared(study: optuna.Study) -> bool:
    backend = _backend(study)
    return isinstance(backend, optuna.storages.RDBStorage) and backend.engine.dialect.name == "postgresql"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_id() -> int:
    """A 31-bit id for this process (host + pid): distinct across concurrent workers."""
    return zlib.crc32(worker_name().encode()) & 0x7FFFFFFF


class LocalCoordinator:
    """One process owns the study: the seed is (seed, completed), reuse comes from the in-process map."""

    seed_parts: tuple[int, ...] = ()

    def before_ask(self, study: optuna.Study) -> None:
        pass

    def alive(self, study: optuna.Study, trial: Trial):
        return nullcontext()

    def previous(self, study: optuna.Study, trial: Trial, key: str,
                 done: dict[str, FrozenTrial]) -> FrozenTrial | None:
        return done.get(key)


class SharedCoordinator(LocalCoordinator):
    """Many workers on a PostgreSQL study: worker-specific seeds, heartbeats, claimed subsets."""

    def __init__(self, study: optuna.Study):
        self.seed_parts = (worker_id(),)
        self.engine = _backend(study).engine
        self.lock_key = zlib.crc32(f"refusal-atlas:{study.study_name}".encode()) & 0x7FFFFFFF

    def before_ask(self, study: optuna.Study) -> None:
        _fail_stale(study)  # dead workers' trials → FAIL, re-queued as WAITING

    @contextmanager
    def alive(self, study: optuna.Study, trial: Trial) -> Iterator[None]:
        """Record heartbeats for ``trial`` while this block runs (ask/tell has no heartbeat of its own)."""
        storage, stop = study._storage, threading.Event()
        storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", worker_name())
        interval = storage.get_heartbeat_interval() or runtime().heartbeat_s

        def beat() -> None:
            while not stop.wait(interval):
                storage.record_heartbeat(trial._trial_id)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.lock_key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.lock_key})
                conn.commit()

    def previous(self, study: optuna.Study, trial: Trial, key: str,
                 done: dict[str, FrozenTrial]) -> FrozenTrial | None:
        """A finished trial of the same edit (``key``) to copy, or None once this trial holds the claim."""
        tag = key
        while True:
            with self._locked():  # check-then-claim is atomic across workers
                same = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                        if t.number != trial.number and t.user_attrs.get("subset") == tag]
                finished = [t for t in same if t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs]
                if finished:
                    return min(finished, key=lambda t: t.number)
                if not same:
                    trial.set_user_attr("subset", tag)
                    return None
            time.sleep(POLL_S)  # another worker is evaluating it: wait for its values (or its death)
            _fail_stale(study)


def coordinator_for(study: optuna.Study) -> LocalCoordinator:
    return SharedCoordinator(study) if _is_shared(study) else LocalCoordinator()
