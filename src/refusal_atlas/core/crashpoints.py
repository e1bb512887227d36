"""Test hook that kills this process at a chosen point, so crash-and-resume tests need no timing.

``REFUSAL_ATLAS_TEST_KILL_AFTER=<stage>:<n>`` sends SIGKILL to the process right after the n-th
unit of ``stage`` work was finished and saved (stages: ``extract`` = one prompt set's
representations, ``generate`` = one batch of completions, ``train`` = one optimizer step with its
checkpoint, ``trial`` = one search trial); a bare ``<n>`` kills DIM selection right after its n-th
saved candidate (:func:`kill_after_save`). ``REFUSAL_ATLAS_TEST_WORK_LOG=<file>`` appends the stage
name to that file at each point, so a test can count the work a rerun did. Unset (always, outside
tests) both do nothing. The variables are read by ``refusal_atlas.settings.test_hooks`` and reach this
module through :mod:`refusal_atlas.core.runtime`.
"""

from __future__ import annotations

import os
import signal

from refusal_atlas.core.runtime import runtime

_done: dict[str, int] = {}


def crash_point(stage: str) -> None:
    """Count one finished unit of ``stage``; SIGKILL ourselves when the hook says this is the one."""
    hooks = runtime()
    if hooks.work_log:
        with open(hooks.work_log, "a", encoding="utf-8") as fh:
            fh.write(stage + "\n")
    if not hooks.kill_after:
        return
    name, _, count = hooks.kill_after.partition(":")
    if name != stage:
        return
    _done[stage] = _done.get(stage, 0) + 1
    if _done[stage] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_after_save(saves: int) -> None:
    """SIGKILL ourselves when the hook is the bare number ``saves`` (DIM selection's checkpoint saves)."""
    if runtime().kill_after == str(saves):
        os.kill(os.getpid(), signal.SIGKILL)
