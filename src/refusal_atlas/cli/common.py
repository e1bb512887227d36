"""What the verb modules share: option types, list parsing and reopening a run directory.

Verb modules import this module, never the package or cli/app.py that registers them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.config import setting_help
from refusal_atlas.core.errors import RefusalAtlasError

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory")]
ModelOpt = Annotated[Optional[str], typer.Option(help=setting_help("model", "HF id, local dir, .gguf file or 'embedded'"))]


def parse_ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RefusalAtlasError(f"expected comma-separated integers, got {text!r}") from None


def parse_names(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def reopen_workspace(run_dir: Path, allowed=(), **overrides):
    """Reopen an existing run (never a new one: a mistyped path must not load a model or make a directory)."""
    from refusal_atlas.workflows.validate import check_run_dir, run_config

    cfg = run_config(check_run_dir(run_dir), overrides)
    from refusal_atlas.workflows.workspace import open_workspace

    return open_workspace(cfg, run_dir, must_exist=True, allowed=allowed)


def run_seed(run_dir: Path, seed: int | None) -> int:
    """Default seed: the run's config seed (manifest), else 0."""
    if seed is not None:
        return seed
    from refusal_atlas.core.rundir import RunDir

    return int(RunDir(run_dir).manifest().get("config", {}).get("seed", 0))
