"""How this process runs, as the library sees it: cache folder, progress bars, heartbeats, crash-test hooks.

These knobs are read deep in the call stack (a progress bar in every loop, the embedded model's cache
wherever a model loads), so they are one process-wide value instead of an argument of every function.
The library never reads the environment for them: :mod:`refusal_atlas.settings` resolves its
``runtime`` section (``REFUSAL_ATLAS_CACHE``, ``REFUSAL_ATLAS_QUIET``, ...) and the crash-test hooks, and
the CLI and the notebook API apply them here with :func:`configure`. A library caller who never does
gets the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Runtime:
    cache: Path | None = None  # converted models; None: ~/.cache/refusal-atlas
    quiet: bool = False  # no progress bars
    # PostgreSQL studies (search/storage.py): a worker's heartbeat interval, and how long a silent trial
    # stays RUNNING before another worker fails and re-queues it
    heartbeat_s: int = 5
    grace_s: int = 30
    # the memory a job may plan for (bytes); None: what the machine has free now; 0: no memory check
    memory_limit: int | None = None
    # test instrumentation (core/crashpoints.py): "<stage>:<n>" or a bare save count, and a work-log file
    kill_after: str | None = None
    work_log: str | None = None

    @property
    def cache_root(self) -> Path:
        return self.cache if self.cache is not None else Path.home() / ".cache" / "refusal-atlas"


_current = Runtime()


def runtime() -> Runtime:
    return _current


def configure(**values) -> Runtime:
    """Set some knobs for this process; returns the previous value (for :func:`restore`)."""
    global _current
    previous, _current = _current, replace(_current, **values)
    return previous


def restore(previous: Runtime) -> None:
    global _current
    _current = previous
