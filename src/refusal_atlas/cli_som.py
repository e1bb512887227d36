"""CLI verbs of the SOM workflow (`directions som`, `search`, `run --method som`), registered by cli.py.

Kept apart from cli.py so the shared command module only gains one registration line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory")]


def _seed(run_dir: Path, seed: int | None) -> int:
    """Default seed: the run's config seed (manifest), else 0."""
    if seed is not None:
        return seed
    from refusal_atlas.rundir import RunDir

    return int(RunDir(run_dir).manifest().get("config", {}).get("seed", 0))


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
    from refusal_atlas.directions.som import SomDirections, parse_grid
    from refusal_atlas.rundir import RunDir
    from refusal_atlas.workflows_som import som_step

    run = RunDir(run_dir)
    builder = SomDirections(grid=parse_grid(grid), sigma=sigma, lr=lr, iterations=iterations,
                            seed=_seed(run_dir, seed), lr_schedule=lr_schedule)  # type: ignore[arg-type]
    d = som_step(run, builder, layer=layer)
    typer.echo(f"{len(d)} live SOM directions at layer {d.layer} (of {grid}); hits {d.meta['hits']}; "
               f"quantization error {d.meta['quantization_error']:.3f}")
    if "cos_to_dim" in d.meta:
        typer.echo("cosine to DIM: " + ", ".join(f"{c:.3f}" for c in d.meta["cos_to_dim"]))
    typer.echo(f"saved to {run.direction_path('som')}")


def search(
    run_dir: RunDirOpt,
    directions: Annotated[str, typer.Option(help="direction file name under directions/")] = "som",
    k: Annotated[int, typer.Option(help="directions per subset (the minimum when --k-max is given)")] = 3,
    k_max: Annotated[Optional[int], typer.Option(help="also search k in [k, k_max]")] = None,
    trials: Annotated[Optional[int], typer.Option(help="trials to add to the study (default 30)")] = None,
    until: Annotated[Optional[int], typer.Option(help="instead: run until this many trials are complete")] = None,
    seed: Annotated[Optional[int], typer.Option(help="default: the run's seed")] = None,
    kl_threshold: Annotated[Optional[float], typer.Option(help="KL bound of the pick rule (default: config)")] = None,
    n_val: Annotated[Optional[int], typer.Option(help="validation prompts per side")] = None,
    n_startup_trials: Annotated[int, typer.Option(help="random trials before TPE")] = 10,
    evaluate: Annotated[bool, typer.Option(help="held-out comparison of the chosen subset vs DIM")] = True,
    storage: Annotated[Optional[str], typer.Option(help="shared study for many workers: postgresql://user@host/db "
                                                        "(default: R/study.db, one process)")] = None,
) -> None:
    """Optuna TPE search over subsets of k directions (validation prompts), Pareto front, held-out check."""
    from refusal_atlas.errors import ConfigError
    from refusal_atlas.pipeline import config_from_run
    from refusal_atlas.search import SearchSettings
    from refusal_atlas.workflows_som import compare_step, format_comparison, format_search, search_step
    from refusal_atlas.workspace import load_prompt_sets, open_workspace

    if trials is not None and until is not None:
        raise ConfigError("give --trials (add N trials) or --until (reach N completed trials), not both")
    if storage is not None:
        from refusal_atlas.search_storage import check_storage

        storage = str(check_storage(storage))  # before the model loads
    ws = open_workspace(config_from_run(run_dir, {"n_val": n_val, "kl_threshold": kl_threshold}), run_dir,
                        must_exist=True)
    settings = SearchSettings(k=k, k_max=k_max, seed=_seed(run_dir, seed), mode=ws.cfg.ablation_mode,
                              kl_threshold=ws.cfg.kl_threshold, n_startup_trials=n_startup_trials)
    sets = load_prompt_sets(ws.cfg)
    summary = search_step(ws, sets, settings, directions, trials=30 if trials is None and until is None else trials,
                          until=until, storage=storage)
    if summary["stale_trials_failed"]:
        typer.echo(f"marked stale trials {summary['stale_trials_failed']} (left by a killed run) as failed")
    typer.echo(format_search(summary))
    typer.echo(f"saved {ws.run / 'search.json'} and {ws.run.direction_path('search_best')}")
    if evaluate:
        typer.echo("\nheld-out comparison (never seen by the search):")
        typer.echo(format_comparison(compare_step(ws, sets)))


def run_som_command(cfg, run_dir: Path, resume: bool, trials: int, k: int) -> None:
    """`run --method som`: the DIM pipeline, SOM directions at the DIM layer, search, held-out comparison."""
    from refusal_atlas.directions.som import SomDirections
    from refusal_atlas.search import SearchSettings
    from refusal_atlas.workflows_som import format_comparison, format_search, run_som

    settings = SearchSettings(k=k, seed=cfg.seed, mode=cfg.ablation_mode, kl_threshold=cfg.kl_threshold)
    ws, summary, comparison = run_som(cfg, run_dir, SomDirections(seed=cfg.seed), settings, trials, resume=resume)
    typer.echo(format_search(summary))
    typer.echo("\nheld-out comparison (never seen by the search):")
    typer.echo(format_comparison(comparison))
    typer.echo(f"\nrun directory: {ws.run.path}  (metrics.json, search.json, study.db, directions/)")


def register(app: typer.Typer, directions_app: typer.Typer) -> None:
    directions_app.command("som")(directions_som)
    app.command("search")(search)
