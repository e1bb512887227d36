"""Progress bars for long steps (tqdm on stderr; silent when the runtime is quiet or the bar disabled)."""

from __future__ import annotations

from tqdm.auto import tqdm

from refusal_atlas.core.runtime import runtime


def progress(total: int | None, desc: str, enabled: bool = True):
    return tqdm(total=total, desc=desc, disable=runtime().quiet or not enabled, leave=False, dynamic_ncols=True)
