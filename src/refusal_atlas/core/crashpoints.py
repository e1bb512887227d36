"""Test hook that kills this process at a chosen point, so crash-and-resume tests need no timing.

``REFUSAL_ATLAS_TEST_KILL_AFTER=<stage>:<n>`` sends SIGKILL to the process right after the n-th
unit of ``stage`` work was finished and saved (stages: ``extract`` = one prompt set's
representations, ``generate`` = one batch of completions, ``train`` = one optimizer step with its
checkpoint, ``trial`` = one search trial). ``REFUSAL_ATLAS_TEST_WORK_LOG=<file>`` appends the stage
name to that file at each point, so a test can count the work a rerun did. Unset (always, outside
tests) both do nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "REFUSAL_ATLAS_TEST_KILL_AFTER"
LOG_ENV = "REFUSAL_ATLAS_TEST_WORK_LOG"
_done: dict[str, int] = {}


def crash_point(stage: str) -> None:
    """Count one finished unit of ``stage``; SIGKILL ourselves when the env var says this is the one."""
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(stage + "\n")
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != stage:
        return
    _done[stage] = _done.get(stage, 0) + 1
    if _done[stage] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
