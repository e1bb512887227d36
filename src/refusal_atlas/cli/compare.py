"""`refusal-atlas compare`: one table over the direction sets and edits of several run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories with metrics.json")],
    out: Annotated[Optional[Path], typer.Option(help="write compare.md and compare.json into this directory")] = None,
) -> None:
    """Method, k, refusal with CI, KL, over-refusal and n for every evaluated artifact (Markdown + JSON)."""
    from refusal_atlas.workflows import verbs

    table, written = verbs.compare(run_dirs, out)
    typer.echo(table, nl=False)
    if written:
        typer.echo(f"wrote {' and '.join(str(p) for p in written)}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
