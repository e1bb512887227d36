"""The `search` verbs: `search edits` (the default: DIM directions × strength kernels × projected ×
norm-preserving, plus any DirectionSets named with --sets) and `search subsets` (the SOM paper's subset
search). `search -r RUN ...` without a sub-command is `search edits`. Jobs: workflows/verbs.py.

After the trials, `search edits` re-scores the best ``--verify N`` proxy-front edits (and full DIM ablation) by
greedy generation on the harmful validation prompts and picks ``search_best`` by those verified rates
(search/verify.py); ``--verify 0`` keeps the proxy's pick. The default 30 trials leave 20 to TPE after the 6 warm
starts and 4 random start-up trials (workflows/search.py says why).

``--trials N`` / ``--budget N`` mean *reach N completed trials in the study* — the same as in
`run --method som --trials N` — so re-running a killed search with the same command finishes the
job instead of overshooting. ``--budget 20m`` (or 90s, 1h) instead adds trials for that long (edits only).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import RunDirOpt, default_subcommand
from refusal_atlas.cli.config import setting_help


search_app = typer.Typer(cls=default_subcommand("edits"), no_args_is_help=True, rich_markup_mode=None,
                         help="Seeded, resumable Optuna TPE searches on validation prompts (`search -r RUN` = "
                              "`search edits -r RUN`).")

TrialsOpt = Annotated[Optional[int], typer.Option(help="completed trials to reach (default 30)")]
SeedOpt = Annotated[Optional[int], typer.Option(help=setting_help("search.seed"))]
KlOpt = Annotated[Optional[float], typer.Option(help=setting_help("kl_threshold", "KL bound of the pick rule"))]
NValOpt = Annotated[Optional[int], typer.Option(help=setting_help("n_val", "validation prompts per side"))]
StartupOpt = Annotated[Optional[int], typer.Option(help=setting_help("search.n_startup_trials"))]
KMaxOpt = Annotated[Optional[int], typer.Option(help=setting_help("search.k_max"))]
StorageOpt = Annotated[Optional[str], typer.Option(help="shared study for many workers: postgresql://user@host/db "
                                                        "(default: R/study.db, one process)")]


def _stale(summary: dict) -> None:
    if summary["stale_trials_failed"]:
        typer.echo(f"marked stale trials {summary['stale_trials_failed']} (left by a killed run) as failed")


@search_app.command("edits")
def search_edits(
    run_dir: RunDirOpt,
    trials: TrialsOpt = None,
    budget: Annotated[Optional[str], typer.Option(help="trials to reach (30) or time to spend (20m, 90s)")] = None,
    sets: Annotated[Optional[str], typer.Option(help=setting_help("search.sets", "comma-separated"))] = None,
    transforms: Annotated[Optional[str], typer.Option(help=setting_help(
        "search.transforms", "write transforms to search among, comma-separated: project,householder,biproject"))] = None,
    router: Annotated[Optional[bool], typer.Option(help=setting_help("search.router"))] = None,
    k_max: KMaxOpt = None,
    seed: SeedOpt = None,
    kl_threshold: KlOpt = None,
    n_val: NValOpt = None,
    n_startup_trials: StartupOpt = None,
    prune: Annotated[Optional[bool], typer.Option(help=setting_help("search.prune"))] = None,
    score_tokens: Annotated[Optional[int], typer.Option(help=setting_help("search.score_tokens"))] = None,
    max_kl: Annotated[Optional[float], typer.Option(help=setting_help("search.max_kl"))] = None,
    refusal_stat: Annotated[Optional[str], typer.Option(help=setting_help("search.refusal_stat"))] = None,
    verify: Annotated[Optional[int], typer.Option(help=setting_help("search.verify"))] = None,
    verify_tokens: Annotated[Optional[int], typer.Option(help=setting_help("search.verify_tokens"))] = None,
    judge: Annotated[Optional[str], typer.Option(help=setting_help("search.judge"))] = None,
    objective: Annotated[Optional[str], typer.Option(help=setting_help(
        "search.objectives", "comma-separated: refusal,kl (default) or refusal,kl,TASK with TASK basics (offline) "
                             "or an lm-eval task"))] = None,
    task_n: Annotated[Optional[int], typer.Option(help=setting_help("search.task_n"))] = None,
    storage: StorageOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="score trials in this dtype (bfloat16: ~2x faster on CPUs "
                                                      "with AVX512-BF16/AMX); export keeps the run's")] = None,
) -> None:
    """The edit search: proxy trials, then the best front edits verified by generation (--verify N); prints the
    front with proxy and verified numbers and each point's origin, saves the pick as edits/search_best."""
    from refusal_atlas.workflows import verbs

    names = None if sets is None else tuple(s.strip() for s in sets.split(",") if s.strip())
    chosen = None if transforms is None else tuple(t.strip() for t in transforms.split(",") if t.strip())
    objectives = None if objective is None else tuple(o.strip() for o in objective.split(","))
    search = dict(sets=names, transforms=chosen, router=router, k_max=k_max, seed=seed, n_startup_trials=n_startup_trials, prune=prune,
                  score_tokens=score_tokens, max_kl=max_kl, refusal_stat=refusal_stat, verify=verify,
                  verify_tokens=verify_tokens, judge=judge, objectives=objectives, task_n=task_n)
    summary = verbs.search_edits(run_dir, {"n_val": n_val, "kl_threshold": kl_threshold, "search": search},
                                 trials=trials, budget=budget, storage=storage, dtype=dtype)
    from refusal_atlas.workflows.search import format_edit_search

    _stale(summary)
    typer.echo(format_edit_search(summary))
    typer.echo(f"saved {run_dir / 'search_edits.json'} and {run_dir / 'edits'}/ "
               "(use `evaluate --edit search_best`, `export --edit search_best`)")


@search_app.command("subsets")
def search_subsets(
    run_dir: RunDirOpt,
    trials: TrialsOpt = None,
    budget: Annotated[Optional[str], typer.Option(help="trials to reach (as --trials)")] = None,
    directions: Annotated[Optional[str], typer.Option(help=setting_help("search.directions"))] = None,
    k: Annotated[Optional[int], typer.Option(help=setting_help("search.k"))] = None,
    k_max: KMaxOpt = None,
    seed: SeedOpt = None,
    kl_threshold: KlOpt = None,
    n_val: NValOpt = None,
    n_startup_trials: StartupOpt = None,
    evaluate: Annotated[Optional[bool], typer.Option(help=setting_help("search.compare"))] = None,
    storage: StorageOpt = None,
) -> None:
    """The SOM paper's subset search: which k directions to ablate together; then held-out vs DIM."""
    from refusal_atlas.workflows import verbs

    search = dict(directions=directions, k=k, k_max=k_max, seed=seed, n_startup_trials=n_startup_trials,
                  compare=evaluate)
    summary, comparison = verbs.search_subsets(run_dir, {"n_val": n_val, "kl_threshold": kl_threshold,
                                                         "search": search}, trials=trials, budget=budget,
                                               storage=storage)
    from refusal_atlas.workflows.som import format_comparison, format_search

    _stale(summary)
    typer.echo(format_search(summary))
    typer.echo(f"saved {run_dir / 'search.json'} and {run_dir / 'directions' / 'search_best.safetensors'}")
    if comparison is not None:
        typer.echo("\nheld-out comparison (never seen by the search):")
        typer.echo(format_comparison(comparison))


def register(app: typer.Typer) -> None:
    app.add_typer(search_app, name="search")
