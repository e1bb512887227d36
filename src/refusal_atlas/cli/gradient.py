"""CLI verbs of the gradient methods (`directions rdo|cone|repind`); the jobs are in workflows/gradient.py.

Each reads the run's DIM direction and settings (manifest), builds or reuses R/targets.json, trains,
and writes R/directions/<name>.safetensors. The run directory and the training options (the ``training``
settings section) are declared once, in :data:`_TRAINING_OPTIONS`, and added to every verb by
:func:`_training_verb`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from refusal_atlas.cli.config import setting_help

if TYPE_CHECKING:
    from refusal_atlas.workflows.workspace import Workspace
else:
    Workspace = Any  # imported when a verb runs: it pulls in torch and the model code

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory (after `refusal-atlas run`)")]


def _option(name: str, kind: type, *flags: str) -> Any:
    return Annotated[Optional[kind], typer.Option(*flags, help=setting_help(f"training.{name}"))]


# the training settings as options (None: not given), appended to every verb's own options, in this order
_TRAINING_OPTIONS: dict[str, Any] = {
    "n_train": _option("n_train", int), "n_val": _option("n_val", int),
    "target_tokens": _option("target_tokens", int), "steps": _option("steps", int),
    "batch_size": _option("batch_size", int, "--batch-size"), "micro_batch": _option("micro_batch", int),
    "lr": _option("lr", float), "eval_every": _option("eval_every", int), "patience": _option("patience", int),
    "ablation_weight": _option("ablation_weight", float), "addition_weight": _option("addition_weight", float),
    "retain_weight": _option("retain_weight", float), "val_kl_weight": _option("val_kl_weight", float),
    "seed": _option("seed", int),
}


def _summary(d) -> str:
    best = next(v for v in d.meta["val_history"] if v["step"] == d.meta["best_step"]) if "val_history" in d.meta else {}
    return (f"best step {d.meta.get('best_step')} ({d.meta.get('stopped')}): val refusal score "
            f"{best.get('refusal', float('nan')):.3f}, KL {best.get('kl', float('nan')):.4f}")


Verb = Callable[..., None]


def _training_verb(method: str) -> Callable[[Verb], Verb]:
    """Turn ``body(ws, trained, *, own options)`` into the typer verb `directions <method>` with --run-dir and
    the training options.

    The options are added to the signature typer reads (``__signature__`` and evaluated
    ``__annotations__``), so they are declared once. The verb runs the job (workflows/verbs.py: ``train``)
    with the body's own options, then the body prints what it made.
    """
    def decorate(body: Verb) -> Verb:
        kw_only = inspect.Parameter.KEYWORD_ONLY
        own = list(inspect.signature(body, eval_str=True).parameters.values())[2:]  # after ws, trained
        shared = [inspect.Parameter(n, kw_only, annotation=a, default=None) for n, a in _TRAINING_OPTIONS.items()]
        params = [inspect.Parameter("run_dir", kw_only, annotation=RunDirOpt), *own, *shared]

        @functools.wraps(body)
        def verb(**options: Any) -> None:
            from refusal_atlas.workflows import verbs

            run_dir = options.pop("run_dir")
            training = {n: options.pop(n) for n in _TRAINING_OPTIONS}
            ws, trained = verbs.train(method, run_dir, training, **options)
            body(ws, trained, **options)

        verb.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        verb.__annotations__ = {**{p.name: p.annotation for p in params}, "return": None}
        return verb

    return decorate


@_training_verb("rdo")
def directions_rdo(
    ws: Workspace,
    d: Any,
    *,
    init: Annotated[Optional[str], typer.Option(help="dim | random | a direction file name (default: dim; "
                                                     "random with --orthogonal)")] = None,
    orthogonal: Annotated[bool, typer.Option(help="RDO⊥: keep the direction orthogonal to DIM")] = False,
    name: Annotated[Optional[str], typer.Option(help="output name (default rdo / rdo_orth)")] = None,
) -> None:
    """Refusal Direction Optimization (gradient-trained single direction)."""
    typer.echo(f"{d.method}: cos with DIM {d.meta['cos_with_dim']:.3f}; {_summary(d)}")
    typer.echo(f"saved to {ws.run.direction_path(name or d.method)}")


@_training_verb("cone")
def directions_cone(
    ws: Workspace,
    cones: Any,
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
    for c in cones:
        typer.echo(f"cone k={len(c)}: {_summary(c)}  -> {ws.run.direction_path(f'{name}_k{len(c)}')}")
        ev = c.meta.get("sample_eval")
        if ev:
            typer.echo(f"  {ev['n_samples']} samples on {ev['n_prompts']} held-out {ev['dataset']} prompts: ablation "
                       f"refusal score min {ev['min']:.2f} / median {ev['median']:.2f} / max {ev['max']:.2f}")


@_training_verb("repind")
def directions_repind(
    ws: Workspace,
    d: Any,
    *,
    n_directions: Annotated[int, typer.Option(help="independent directions to find, one after another")] = 1,
    restarts: Annotated[int, typer.Option(help="runs per direction; the best on validation is kept")] = 1,
    independence_weight: Annotated[float, typer.Option(help="weight of the independence loss")] = 200.0,
    init: Annotated[str, typer.Option(help="random | dim | a direction file name (e.g. rdo_orth)")] = "random",
    orthogonal: Annotated[bool, typer.Option(help="also keep each direction orthogonal to the earlier ones")] = False,
    name: Annotated[str, typer.Option(help="output name")] = "repind",
) -> None:
    """Representationally independent refusal directions (independent of DIM and of each other)."""
    for run in d.meta["runs"]:
        typer.echo(f"direction {run['direction']} restart {run['restart']}: val objective {run['val_objective']:.3f} "
                   f"(best step {run['best_step']}, {run['stopped']})")
    typer.echo(f"cos with DIM: {', '.join(f'{c:.3f}' for c in d.meta['cos_with_dim'])}; "
               f"saved to {ws.run.direction_path(name)}")


def register(directions_app: typer.Typer) -> None:
    directions_app.command("rdo")(directions_rdo)
    directions_app.command("cone")(directions_cone)
    directions_app.command("repind")(directions_repind)
