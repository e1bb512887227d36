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
    from refusal_atlas.workflows.validate import check_run_dir

    for d in run_dirs:
        check_run_dir(d)  # the same run-directory checks as every verb, before any work
    from refusal_atlas.core.io import write_text
    from refusal_atlas.workflows.compare import collect, to_json, to_markdown

    rows = collect(run_dirs)
    table = to_markdown(rows)
    typer.echo(table, nl=False)
    if out is not None:
        write_text(out / "compare.md", table)
        write_text(out / "compare.json", to_json(rows))
        typer.echo(f"wrote {out / 'compare.md'} and {out / 'compare.json'}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
