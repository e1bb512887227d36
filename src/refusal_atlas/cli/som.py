"""`directions som` (the SOM workflow's other verbs: `run --method som` in cli/run.py, `search subsets` in
cli/search.py; jobs in workflows/verbs.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import RunDirOpt


def directions_som(
    run_dir: RunDirOpt,
    grid: Annotated[str, typer.Option(help="map size, e.g. 4x4")] = "4x4",
    sigma: Annotated[float, typer.Option(help="Gaussian neighbourhood width")] = 0.33,
    lr: Annotated[float, typer.Option(help="initial learning rate")] = 0.01,
    iterations: Annotated[int, typer.Option(help="online updates")] = 10_000,
    layer: Annotated[Optional[int], typer.Option(help="block-input layer (default: the DIM direction's layer)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="default: the run's seed")] = None,
    lr_schedule: Annotated[str, typer.Option(help="asymptotic (paper), inverse (1/t), constant")] = "asymptotic",
) -> None:
    """SOM directions: neurons of a SOM on harmful representations minus the harmless mean."""
    from refusal_atlas.workflows import verbs

    d, path = verbs.som(run_dir, grid=grid, sigma=sigma, lr=lr, iterations=iterations, layer=layer, seed=seed,
                        lr_schedule=lr_schedule)
    typer.echo(f"{len(d)} live SOM directions at layer {d.layer} (of {grid}); hits {d.meta['hits']}; "
               f"quantization error {d.meta['quantization_error']:.3f}")
    if "cos_to_dim" in d.meta:
        typer.echo("cosine to DIM: " + ", ".join(f"{c:.3f}" for c in d.meta["cos_to_dim"]))
    typer.echo(f"saved to {path}")


def register(directions_app: typer.Typer) -> None:
    directions_app.command("som")(directions_som)
