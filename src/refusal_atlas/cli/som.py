"""CLI verbs of the SOM workflow (`directions som`, `run --method som`; `search` lives in cli/search.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import RunDirOpt, run_seed


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
    from refusal_atlas.workflows.validate import check_run_dir

    check_run_dir(run_dir, require_manifest=False)
    from refusal_atlas.directions.som import SomDirections, parse_grid
    from refusal_atlas.core.rundir import RunDir
    from refusal_atlas.workflows.som import som_step

    run = RunDir(run_dir)
    builder = SomDirections(grid=parse_grid(grid), sigma=sigma, lr=lr, iterations=iterations,
                            seed=run_seed(run_dir, seed), lr_schedule=lr_schedule)  # type: ignore[arg-type]
    d = som_step(run, builder, layer=layer)
    typer.echo(f"{len(d)} live SOM directions at layer {d.layer} (of {grid}); hits {d.meta['hits']}; "
               f"quantization error {d.meta['quantization_error']:.3f}")
    if "cos_to_dim" in d.meta:
        typer.echo("cosine to DIM: " + ", ".join(f"{c:.3f}" for c in d.meta["cos_to_dim"]))
    typer.echo(f"saved to {run.direction_path('som')}")


def run_som_command(cfg, run_dir: Path, resume: bool, trials: int, k: int, allow_low_refusal: bool = False) -> None:
    """`run --method som`: the DIM pipeline, SOM directions at the DIM layer, search, held-out comparison."""
    from refusal_atlas.directions.som import SomDirections
    from refusal_atlas.core.errors import ConfigError
    from refusal_atlas.search.subsets import SearchSettings
    from refusal_atlas.workflows.validate import check_at_least
    from refusal_atlas.workflows.som import format_comparison, format_search, run_som

    builder = SomDirections(seed=cfg.seed)
    check_at_least(k=(k, 1), trials=(trials, 1))
    rows, cols = builder.grid
    if k > rows * cols:  # before the DIM pipeline, not after it
        raise ConfigError(f"--k {k} is larger than the SOM grid ({rows}x{cols} = {rows * cols} neurons, fewer if "
                          f"some stay dead); use --k <= {rows * cols}")
    settings = SearchSettings(k=k, seed=cfg.seed, mode=cfg.ablation_mode, kl_threshold=cfg.kl_threshold)
    ws, summary, comparison = run_som(cfg, run_dir, builder, settings, trials, resume=resume,
                                      allow_low_refusal=allow_low_refusal)
    typer.echo(format_search(summary))
    typer.echo("\nheld-out comparison (never seen by the search):")
    typer.echo(format_comparison(comparison))
    typer.echo(f"\nrun directory: {ws.run.path}  (metrics.json, search.json, study.db, directions/)")


def register(directions_app: typer.Typer) -> None:
    directions_app.command("som")(directions_som)
