"""CLI verb group `train-edit`: edits trained by gradient, not built from directions. `train-edit ara` trains the
ARA-style low-rank edit (the job is workflows/ara.py, through workflows/verbs.py: ``train_edit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import RunDirOpt
from refusal_atlas.cli.config import setting_help

train_edit_app = typer.Typer(help="Train an edit by gradient on a run directory (ara: a low-rank update of "
                                  "o_proj/down_proj, no refusal direction).", no_args_is_help=True,
                             rich_markup_mode=None)


def _opt(name: str, kind: type, text: str = "") -> object:
    return Annotated[Optional[kind], typer.Option(help=setting_help(f"ara.{name}", text))]


@train_edit_app.command("ara")
def train_edit_ara(
    run_dir: RunDirOpt,
    rank: _opt("rank", int) = None,  # type: ignore[valid-type]
    layers: Annotated[Optional[str], typer.Option(help=setting_help(
        "ara.layers", "edited blocks: a range 8-18 or a list 8,10,12 (default: floor(L/3) .. 0.8·L)"))] = None,
    components: Annotated[Optional[str], typer.Option(help=setting_help(
        "ara.components", "attn, mlp or attn,mlp"))] = None,
    target_layer: _opt("target_layer", int) = None,  # type: ignore[valid-type]
    steps: _opt("steps", int) = None,  # type: ignore[valid-type]
    lr: _opt("lr", float) = None,  # type: ignore[valid-type]
    batch_size: _opt("batch_size", int) = None,  # type: ignore[valid-type]
    micro_batch: _opt("micro_batch", int) = None,  # type: ignore[valid-type]
    n_train: _opt("n_train", int) = None,  # type: ignore[valid-type]
    n_val: _opt("n_val", int) = None,  # type: ignore[valid-type]
    retain_tokens: _opt("retain_tokens", int) = None,  # type: ignore[valid-type]
    shift_weight: _opt("shift_weight", float) = None,  # type: ignore[valid-type]
    retain_weight: _opt("retain_weight", float) = None,  # type: ignore[valid-type]
    val_kl_weight: _opt("val_kl_weight", float) = None,  # type: ignore[valid-type]
    eval_every: _opt("eval_every", int) = None,  # type: ignore[valid-type]
    patience: _opt("patience", int) = None,  # type: ignore[valid-type]
    seed: _opt("seed", int) = None,  # type: ignore[valid-type]
    name: Annotated[str, typer.Option(help="saved as edits/<name>.json (+ .safetensors)")] = "ara",
    adapter: Annotated[Optional[Path], typer.Option(help="also write the edit as a PEFT LoRA adapter here "
                                                         "(A and B as trained)")] = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty --adapter directory")] = False,
) -> None:
    """ARA-style edit: train ΔW = B·A on each chosen block's o_proj and down_proj so harmful prompts'
    representations move to where harmless ones sit, with a KL retain loss; checkpointed every step (rerun the
    same command after a crash to resume)."""
    from refusal_atlas.workflows import verbs

    ara = dict(rank=rank, layers=verbs.parse_layers(layers), target_layer=target_layer, steps=steps, lr=lr,
               batch_size=batch_size, micro_batch=micro_batch, n_train=n_train, n_val=n_val,
               retain_tokens=retain_tokens, shift_weight=shift_weight, retain_weight=retain_weight,
               val_kl_weight=val_kl_weight, eval_every=eval_every, patience=patience, seed=seed,
               components=None if components is None else tuple(c.strip() for c in components.split(",") if c.strip()))
    ws, edit, summary = verbs.train_edit("ara", run_dir, ara, name=name, adapter=adapter, force=force)
    m = edit.meta
    typer.echo(f"ara: rank {edit.rank} on blocks {m['ara']['layers'][0]}..{m['ara']['layers'][-1]} "
               f"({', '.join(m['ara']['components'])}), target layer {m['ara']['target_layer']}; best step "
               f"{m['best_step']} ({m['stopped']}): val refusal score {m['val']['refusal']:.3f}, KL {m['val']['kl']:.4f}")
    typer.echo(f"saved {run_dir / 'edits' / name}.json (use `evaluate --edit {name}`, `export --edit {name}`)")
    if summary is not None:
        typer.echo(f"PEFT adapter (rank {summary['rank']}, {summary['modules']} modules) written to {summary['path']}")


def register(app: typer.Typer) -> None:
    app.add_typer(train_edit_app, name="train-edit")
