"""Progress bars for long steps (tqdm on stderr; silent when REFUSAL_ATLAS_QUIET=1 or disabled)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(total: int | None, desc: str, enabled: bool = True):
    quiet = os.environ.get("REFUSAL_ATLAS_QUIET") == "1"
    return tqdm(total=total, desc=desc, disable=quiet or not enabled, leave=False, dynamic_ncols=True)
