"""The `search` verb: the edit search by default (DIM directions × strength kernels × projected ×
norm-preserving, plus any DirectionSets named with --sets), or the SOM paper's subset search
(--space subsets).

``--trials N`` / ``--budget N`` mean *reach N completed trials in the study* — the same as in
`run --method som --trials N` — so re-running a killed search with the same command finishes the
job instead of overshooting. ``--budget 20m`` (or 90s, 1h) instead adds trials for that long.
"""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import RunDirOpt, run_seed
from refusal_atlas.core.errors import ConfigError


def parse_budget(text: str | None, trials: int | None) -> tuple[int | None, float | None]:
    """--trials / --budget → (trials to reach, minutes); default: reach 30 trials."""
    if text is not None and trials is not None:
        raise ConfigError("give --trials or --budget, not both")
    if text is None:
        n = 30 if trials is None else trials
        if n < 1:
            raise ConfigError(f"--trials must be >= 1, got {n}")
        return n, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", text)
    if not m:
        raise ConfigError(f"--budget {text!r}: give a number of trials (30) or a time (20m, 90s, 1h)")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        if value != int(value) or value < 1:
            raise ConfigError(f"--budget {text!r}: a trial count must be a whole number >= 1")
        return int(value), None
    minutes = value * {"s": 1 / 60, "m": 1, "min": 1, "h": 60}[unit]
    if minutes <= 0:
        raise ConfigError(f"--budget {text!r} must be > 0")
    return None, minutes


def search(
    run_dir: RunDirOpt,
    trials: Annotated[Optional[int], typer.Option(help="completed trials to reach (default 30)")] = None,
    budget: Annotated[Optional[str], typer.Option(help="trials to reach (30) or time to spend (20m, 90s)")] = None,
    space: Annotated[str, typer.Option(help="edits (default) or subsets (SOM-paper subset search)")] = "edits",
    sets: Annotated[Optional[str], typer.Option(help="edits: DirectionSets to add as sources, e.g. som")] = None,
    k_max: Annotated[Optional[int], typer.Option(help="edits: most directions per subset (1..7)")] = None,
    directions: Annotated[str, typer.Option(help="subsets: direction file name under directions/")] = "som",
    k: Annotated[int, typer.Option(help="subsets: directions per subset; with --k-max, k is searched in [k, k_max]")] = 3,
    seed: Annotated[Optional[int], typer.Option(help="default: the run's seed")] = None,
    kl_threshold: Annotated[Optional[float], typer.Option(help="KL bound of the pick rule (default: config)")] = None,
    n_val: Annotated[Optional[int], typer.Option(help="validation prompts per side")] = None,
    n_startup_trials: Annotated[int, typer.Option(help="random trials before TPE")] = 10,
    prune: Annotated[bool, typer.Option(help="edits: stop clearly dominated trials after 25% of the prompts")] = True,
    score_tokens: Annotated[int, typer.Option(help="edits: refusal = substring rate of N greedy tokens (0: logit)")] = 0,
    max_kl: Annotated[Optional[float], typer.Option(help="edits: a KL cap; edits above it stay off the front and TPE "
                                                         "learns to avoid them (pruned early when clearly above)")] = None,
    refusal_stat: Annotated[str, typer.Option(help="edits: refusal number = mean first-token refusal probability "
                                                   "(probability) or mean refusal log-odds (logodds)")] = "probability",
    evaluate: Annotated[Optional[bool], typer.Option(help="subsets: held-out comparison vs DIM (default on)")] = None,
    storage: Annotated[Optional[str], typer.Option(help="shared study for many workers: postgresql://user@host/db "
                                                        "(default: R/study.db, one process)")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="edits: score trials in this dtype (bfloat16: ~2x faster on "
                                                      "CPUs with AVX512-BF16/AMX); export keeps the run's")] = None,
) -> None:
    """Seeded, resumable Optuna TPE search on validation prompts; prints the Pareto front, saves the pick."""
    from refusal_atlas.workflows.validate import check_at_least, check_direction_file, check_run_dir, run_config

    if storage is not None:
        from refusal_atlas.search.storage import check_storage

        storage = str(check_storage(storage))
    manifest = check_run_dir(run_dir)  # milliseconds, before anything heavy is imported
    if space not in ("edits", "subsets"):
        raise ConfigError(f"unknown --space {space!r}; choose edits or subsets")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    until, minutes = parse_budget(budget, trials)
    check_at_least(k=(k, 1), n_val=(n_val, 1), n_startup_trials=(n_startup_trials, 0), score_tokens=(score_tokens, 0))
    if dtype is not None:
        from refusal_atlas.model.loading import resolve_dtype

        if space != "edits":
            raise ConfigError("--dtype is for --space edits")
        resolve_dtype(dtype, "cpu")  # an unknown name fails here, before the model loads
    if refusal_stat not in ("probability", "logodds"):  # search.trial.REFUSAL_STATS, without importing torch
        raise ConfigError(f"unknown --refusal-stat {refusal_stat!r}; choose probability or logodds")
    if max_kl is not None and (space != "edits" or not max_kl > 0):
        raise ConfigError("--max-kl is for --space edits" if space != "edits" else f"--max-kl must be > 0, got {max_kl}")
    if space != "edits" and refusal_stat != "probability":
        raise ConfigError("--refusal-stat is for --space edits")
    set_names = tuple(s.strip() for s in (sets or "").split(",") if s.strip())
    if space == "subsets" and set_names:
        raise ConfigError("--sets is for --space edits; subsets take --directions")
    if space == "edits":
        from refusal_atlas.workflows.search import check_sets

        check_sets(run_dir, set_names, k_max)
    else:
        if minutes is not None:
            raise ConfigError("--space subsets takes a trial budget (--trials N), not a time")
        check_at_least(k_max=(k_max, k))
        found = check_direction_file(run_dir / "directions" / f"{directions}.safetensors", manifest)
        if max(k, k_max or k) > found["k"]:
            raise ConfigError(f"--k {max(k, k_max or k)} but {directions} holds only {found['k']} directions; "
                              "lower --k/--k-max or use a larger SOM")
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    cfg = run_config(manifest, {"n_val": n_val, "kl_threshold": kl_threshold})
    ws = open_workspace(cfg, run_dir, must_exist=True, allowed=("n_val", "kl_threshold"), load_dtype=dtype)
    prompt_sets = load_prompt_sets(ws.cfg)
    if space == "edits":
        from refusal_atlas.workflows.search import EditSearchSettings, edit_search_step, format_edit_search

        settings = EditSearchSettings(seed=run_seed(run_dir, seed), kl_threshold=ws.cfg.kl_threshold,
                                      n_startup_trials=n_startup_trials, sets=set_names, k_max=k_max,
                                      score_tokens=score_tokens, refusal_stat=refusal_stat, max_kl=max_kl,
                                      **({} if prune else {"prune": None}))
        summary = edit_search_step(ws, prompt_sets, settings, until=until, minutes=minutes, storage=storage)
        if summary["stale_trials_failed"]:
            typer.echo(f"marked stale trials {summary['stale_trials_failed']} (left by a killed run) as failed")
        typer.echo(format_edit_search(summary))
        typer.echo(f"saved {ws.run / 'search_edits.json'} and {ws.run / 'edits'}/ "
                   "(use `evaluate --edit search_best`, `export --edit search_best`)")
        return
    from refusal_atlas.search.subsets import SearchSettings
    from refusal_atlas.workflows.som import compare_step, format_comparison, format_search, search_step

    settings = SearchSettings(k=k, k_max=k_max, seed=run_seed(run_dir, seed), mode=ws.cfg.ablation_mode,
                              kl_threshold=ws.cfg.kl_threshold, n_startup_trials=n_startup_trials)
    summary = search_step(ws, prompt_sets, settings, directions, until=until, storage=storage)
    if summary["stale_trials_failed"]:
        typer.echo(f"marked stale trials {summary['stale_trials_failed']} (left by a killed run) as failed")
    typer.echo(format_search(summary))
    typer.echo(f"saved {ws.run / 'search.json'} and {ws.run.direction_path('search_best')}")
    if evaluate is None or evaluate:
        typer.echo("\nheld-out comparison (never seen by the search):")
        typer.echo(format_comparison(compare_step(ws, prompt_sets)))


def register(app: typer.Typer) -> None:
    app.command("search")(search)
