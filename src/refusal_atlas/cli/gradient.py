"""CLI verbs of the gradient methods (`directions rdo|cone|repind`); the jobs are in workflows/gradient.py.

Each reads the run's DIM direction and config (manifest), builds or reuses R/targets.json, trains,
and writes R/directions/<name>.safetensors. The run directory and the training options are declared once,
in :data:`_TRAINING_OPTIONS`, and added to every verb by :func:`_training_verb`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from refusal_atlas.workflows.workspace import Workspace
else:
    Workspace = Any  # imported when a verb runs: it pulls in torch and the model code

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory (after `refusal-atlas run`)")]

# name: (type with its typer option, default); appended to every verb's own options, in this order
_TRAINING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "n_train": (Annotated[int, typer.Option(help="train prompts sampled per side (then filtered like the run)")],
                64),
    "n_val": (Annotated[int, typer.Option(help="validation prompts per side (model selection)")], 16),
    "target_tokens": (Annotated[int, typer.Option(help="greedy tokens per target")], 30),
    "steps": (Annotated[int, typer.Option(help="max optimizer steps")], 40),
    "batch_size": (Annotated[int, typer.Option("--batch-size", help="examples per optimizer step")], 8),
    "micro_batch": (Annotated[int, typer.Option(help="examples per forward pass")], 4),
    "lr": (Annotated[float, typer.Option(help="AdamW learning rate")], 1e-2),
    "eval_every": (Annotated[int, typer.Option(help="validate every N steps")], 4),
    "patience": (Annotated[int, typer.Option(help="validations without improvement before the lr is cut")], 3),
    "ablation_weight": (Annotated[float, typer.Option(help="ablation CE weight")], 1.0),
    "addition_weight": (Annotated[float, typer.Option(help="addition CE weight")], 0.2),
    "retain_weight": (Annotated[float, typer.Option(help="retain KL weight")], 1.0),
    "val_kl_weight": (Annotated[float, typer.Option(help="KL weight in the validation objective")], 10.0),
    "seed": (Annotated[Optional[int], typer.Option(help="default: the run's seed")], None),
}


def _common(run_dir, *, n_train, n_val, target_tokens, steps, batch_size, micro_batch, lr, eval_every, patience,
            ablation_weight, addition_weight, retain_weight, val_kl_weight, seed):
    from refusal_atlas.workflows.validate import check_run_dir

    check_run_dir(run_dir)  # milliseconds, before torch is imported
    from refusal_atlas.cli.common import reopen_workspace, run_seed
    from refusal_atlas.directions.losses import LossWeights
    from refusal_atlas.directions.optim import TrainConfig
    from refusal_atlas.workflows.gradient import load_dim

    load_dim(run_dir)  # bad input fails before the model is loaded
    seed = run_seed(run_dir, seed)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, micro_batch=micro_batch, lr=lr, eval_every=eval_every,
                      patience=patience, val_kl_weight=val_kl_weight, seed=seed)
    weights = LossWeights(ablation_weight, addition_weight, retain_weight)
    ws = reopen_workspace(run_dir)
    return ws, dict(n_train=n_train, n_val=n_val, target_tokens=target_tokens, weights=weights, cfg=cfg)


def _summary(d) -> str:
    best = next(v for v in d.meta["val_history"] if v["step"] == d.meta["best_step"]) if "val_history" in d.meta else {}
    return (f"best step {d.meta.get('best_step')} ({d.meta.get('stopped')}): val refusal score "
            f"{best.get('refusal', float('nan')):.3f}, KL {best.get('kl', float('nan')):.4f}")


Verb = Callable[..., None]


def _training_verb(**defaults: Any) -> Callable[[Verb], Verb]:
    """Turn ``body(ws, kw, *, own options)`` into a typer verb with --run-dir and the training options.

    The options are added to the signature typer reads (``__signature__`` and evaluated
    ``__annotations__``), so they are declared once; ``defaults`` overrides a default per verb. The
    verb opens the run (``_common``) and calls the body with the workspace and the keyword
    arguments every ``*_step`` takes.
    """
    unknown = set(defaults) - set(_TRAINING_OPTIONS)
    if unknown:
        raise TypeError(f"not training options: {sorted(unknown)}")

    def decorate(body: Verb) -> Verb:
        kw_only = inspect.Parameter.KEYWORD_ONLY
        own = list(inspect.signature(body, eval_str=True).parameters.values())[2:]  # after ws, kw
        shared = [inspect.Parameter(n, kw_only, annotation=a, default=defaults.get(n, d))
                  for n, (a, d) in _TRAINING_OPTIONS.items()]
        params = [inspect.Parameter("run_dir", kw_only, annotation=RunDirOpt), *own, *shared]

        @functools.wraps(body)
        def verb(**options: Any) -> None:
            run_dir = options.pop("run_dir")
            ws, kw = _common(run_dir, **{n: options.pop(n) for n in _TRAINING_OPTIONS})
            body(ws, kw, **options)

        verb.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        verb.__annotations__ = {**{p.name: p.annotation for p in params}, "return": None}
        return verb

    return decorate


@_training_verb()
def directions_rdo(
    ws: Workspace,
    kw: dict[str, Any],
    *,
    init: Annotated[Optional[str], typer.Option(help="dim | random | a direction file name (default: dim; "
                                                     "random with --orthogonal)")] = None,
    orthogonal: Annotated[bool, typer.Option(help="RDO⊥: keep the direction orthogonal to DIM")] = False,
    name: Annotated[Optional[str], typer.Option(help="output name (default rdo / rdo_orth)")] = None,
) -> None:
    """Refusal Direction Optimization (gradient-trained single direction)."""
    from refusal_atlas.workflows.gradient import rdo_step

    d = rdo_step(ws, name=name, init=init, orthogonal=orthogonal, **kw)
    typer.echo(f"{d.method}: cos with DIM {d.meta['cos_with_dim']:.3f}; {_summary(d)}")
    typer.echo(f"saved to {ws.run.direction_path(name or d.method)}")


@_training_verb(micro_batch=2)
def directions_cone(
    ws: Workspace,
    kw: dict[str, Any],
    *,
    k_max: Annotated[int, typer.Option("--k", "--k-max", help="largest cone dimension")] = 2,
    k_min: Annotated[int, typer.Option(help="smallest cone dimension of the sweep")] = 2,
    warm_start: Annotated[Optional[str], typer.Option(help="direction file: the first k_min-1 basis vectors")] = None,
    init: Annotated[str, typer.Option(help="without warm start: first basis vector dim | random")] = "dim",
    n_val_samples: Annotated[int, typer.Option(help="fixed cone samples in the validation objective")] = 4,
    n_eval_samples: Annotated[int, typer.Option(help="cone samples scored on held-out harmful prompts after "
                                                     "training, saved with the basis (0: skip)")] = 16,
    n_eval_prompts: Annotated[int, typer.Option(help="held-out prompts (the run's first eval set) for that")] = 50,
    name: Annotated[str, typer.Option(help="output name")] = "cone",
) -> None:
    """Refusal cones: orthonormal bases whose positive span mediates refusal (sweep k_min..k)."""
    from refusal_atlas.workflows.gradient import cone_step

    cones = cone_step(ws, k_min=k_min, k_max=k_max, name=name, warm_start=warm_start, init=init,
                      n_val_samples=n_val_samples, n_eval_samples=n_eval_samples, n_eval_prompts=n_eval_prompts, **kw)
    for c in cones:
        typer.echo(f"cone k={len(c)}: {_summary(c)}  -> {ws.run.direction_path(f'{name}_k{len(c)}')}")
        ev = c.meta.get("sample_eval")
        if ev:
            typer.echo(f"  {ev['n_samples']} samples on {ev['n_prompts']} held-out {ev['dataset']} prompts: ablation "
                       f"refusal score min {ev['min']:.2f} / median {ev['median']:.2f} / max {ev['max']:.2f}")


@_training_verb()
def directions_repind(
    ws: Workspace,
    kw: dict[str, Any],
    *,
    n_directions: Annotated[int, typer.Option(help="independent directions to find, one after another")] = 1,
    restarts: Annotated[int, typer.Option(help="runs per direction; the best on validation is kept")] = 1,
    independence_weight: Annotated[float, typer.Option(help="weight of the independence loss")] = 200.0,
    init: Annotated[str, typer.Option(help="random | dim | a direction file name (e.g. rdo_orth)")] = "random",
    orthogonal: Annotated[bool, typer.Option(help="also keep each direction orthogonal to the earlier ones")] = False,
    name: Annotated[str, typer.Option(help="output name")] = "repind",
) -> None:
    """Representationally independent refusal directions (independent of DIM and of each other)."""
    from refusal_atlas.workflows.gradient import repind_step

    d = repind_step(ws, name=name, n_directions=n_directions, restarts=restarts,
                    independence_weight=independence_weight, init=init, orthogonal=orthogonal, **kw)
    for run in d.meta["runs"]:
        typer.echo(f"direction {run['direction']} restart {run['restart']}: val objective {run['val_objective']:.3f} "
                   f"(best step {run['best_step']}, {run['stopped']})")
    typer.echo(f"cos with DIM: {', '.join(f'{c:.3f}' for c in d.meta['cos_with_dim'])}; "
               f"saved to {ws.run.direction_path(name)}")


def register(directions_app: typer.Typer) -> None:
    directions_app.command("rdo")(directions_rdo)
    directions_app.command("cone")(directions_cone)
    directions_app.command("repind")(directions_repind)
