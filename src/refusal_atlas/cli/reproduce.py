"""`refusal-atlas reproduce`: the seed papers' claims (a)–(g), measured and judged in one resumable job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def reproduce(
    model: Annotated[str, typer.Option(help="model id or path (default: the embedded Qwen2.5-Coder-0.5B)")] = "embedded",
    budget: Annotated[str, typer.Option(help="quick (CPU, a first look; under an hour on the embedded "
                                             "model, an estimate), standard (CPU, n = 300; about two hours, an "
                                             "estimate) or full (GPU, paper scale)")] = "quick",
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="default: runs/reproduce-<budget>")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, mps (None: best available)")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16")] = None,
    allow_low_refusal: Annotated[bool, typer.Option(help="continue when the model refuses < 10% of harmful train "
                                                         "prompts")] = False,
) -> None:
    """Rows (a)–(g) with n, 95% CIs and verdicts → R/reproduce.json, R/reproduce.md, R/plots; rerun to resume."""
    from refusal_atlas.workflows.reproduce.budget import budget_named
    from refusal_atlas.workflows.reproduce.job import run_reproduce

    chosen = budget_named(budget)
    run_dir = run_dir or Path("runs") / f"reproduce-{chosen.name}"
    data = run_reproduce(run_dir, chosen, model, device, dtype, allow_low_refusal)
    for rid, row in data["rows"].items():
        typer.echo(f"({rid}) {row['verdict']['verdict']:<14} {row['claim']}")
        for caveat in row.get("caveats", []):  # a verdict is never shown without what qualifies it
            typer.echo(f"    caveat: {caveat}")
    typer.echo(f"wrote {run_dir / 'reproduce.md'} and {run_dir / 'reproduce.json'}")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
