"""What the verb modules share: option types and list parsing.

Verb modules import this module, never the package or cli/app.py that registers them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from refusal_atlas.cli.config import setting_help
from refusal_atlas.core.errors import RefusalAtlasError

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory")]
ModelOpt = Annotated[Optional[str], typer.Option(help=setting_help("model", "HF id, local dir, .gguf file or 'embedded'"))]


def default_subcommand(name: str) -> type[TyperGroup]:
    """A Typer group class whose first argument, when it names none of its sub-commands (nor asks for help),
    is read as the start of sub-command ``name``'s arguments: `search -r RUN` is `search edits -r RUN`,
    `judge FILE` is `judge score FILE`."""

    class DefaultSubcommand(TyperGroup):
        def parse_args(self, ctx, args: list[str]) -> list[str]:
            if args and args[0] not in self.commands and args[0] not in (*ctx.help_option_names, "-h"):
                args = [name, *args]
            return super().parse_args(ctx, args)

    return DefaultSubcommand


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
