"""The gradient methods on a run directory: what they train on, and training plus saving.

:func:`prepare_training` reads the run's DIM direction, builds or reuses R/targets.json and sets up
the training data and validation prompts (a :class:`TrainingSetup`, what every ``train_*`` takes);
:func:`train_on_run` is the body of every ``*_step``: prepare, train (timed), save to
R/directions. Kept apart from optim.py (the training loop), which does not import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.checkpoint import checkpointing
from refusal_atlas.directions.optim import TrainConfig, TrainingData, ValidationSet
from refusal_atlas.directions.targets import Targets, build_targets, direction_fingerprint
from refusal_atlas.errors import ArtifactError, ConfigError


@dataclass
class TrainingSetup:
    """Everything a gradient method needs from a run directory."""

    dim: DirectionSet
    targets: Targets
    data: TrainingData
    val: ValidationSet
    provenance: dict[str, Any]


def load_dim(run_path) -> DirectionSet:
    """The run's selected DIM direction (R/directions/dim.safetensors) or a clear error."""
    from refusal_atlas.rundir import RunDir

    path = RunDir(run_path).direction_path("dim")
    if not path.exists():
        raise ArtifactError(f"no DIM direction at {path}; the gradient methods build their targets and α from it "
                            "(run `refusal-atlas run` or `refusal-atlas select` first)")
    return DirectionSet.load(path)


def prepare_training(ws, *, n_train: int = 64, n_val: int = 16, target_tokens: int = 30,
                     kl_weight: float = 10.0) -> TrainingSetup:
    """DIM direction, cached targets (R/targets.json), tokenized training data and a validation set.

    Train prompts: the run's harmful/harmless train sets (``n_train`` sampled with the run's seed),
    filtered like the DIM step when the run filters (harmful prompts the model refuses, harmless
    ones it answers). Validation: ``n_val`` prompts of the run's val sets.
    """
    from refusal_atlas.data import load_prompts
    from refusal_atlas.pipeline import filter_by_refusal

    if n_train < 2 or n_val < 1:
        raise ConfigError(f"need n_train >= 2 and n_val >= 1, got {n_train}, {n_val}")
    cfg = ws.cfg
    dim = load_dim(ws.run.path)
    harmful = load_prompts(cfg.harmful_train, n=n_train, seed=cfg.seed)
    harmless = load_prompts(cfg.harmless_train, n=n_train, seed=cfg.seed)
    if cfg.filter_train:
        harmful, harmless = filter_by_refusal(ws, harmful, harmless)
    targets = build_targets(ws.adapter, ws.chat, dim, [p.instruction for p in harmful],
                            [p.instruction for p in harmless], max_new_tokens=target_tokens,
                            batch_size=cfg.batch_size, cache=ws.run / "targets.json")

    def texts(name: str) -> list[str]:
        return [p.instruction for p in load_prompts(name, n=n_val, seed=cfg.seed)]

    val = ValidationSet(ws.adapter, ws.chat, texts(cfg.harmful_val), texts(cfg.harmless_val), ws.refusal_ids,
                        cfg.batch_size, kl_weight)
    model = ws.run.manifest().get("model", {})
    provenance = {"provenance": {
        "model": model.get("name", ws.loaded.name), "model_sha256": model.get("gguf_sha256"),
        "dim_fingerprint": direction_fingerprint(dim), "dim_layer": dim.layer, "dim_position": dim.position,
        "harmful_train": cfg.harmful_train, "harmless_train": cfg.harmless_train, "n_train_sampled": n_train,
        "filtered": cfg.filter_train, "n_harmful": len(targets.harmful), "n_harmless": len(targets.harmless),
        "harmful_val": cfg.harmful_val, "harmless_val": cfg.harmless_val, "n_val": n_val,
        "target_tokens": target_tokens, "targets": "targets.json", "seed": cfg.seed,
        "system_prompt": cfg.system_prompt}}
    return TrainingSetup(dim, targets, TrainingData(ws.chat, targets, ws.adapter.device), val, provenance)


def save_direction(ws, direction: DirectionSet, name: str) -> Path:
    """Save to R/directions/<name>.safetensors and note it in the manifest."""
    path = direction.save(ws.run.direction_path(name))
    ws.run.update_manifest(gradient_directions={name: {
        "method": direction.method, "k": len(direction), "layer": direction.layer,
        "best_step": direction.meta.get("best_step"), "stopped": direction.meta.get("stopped")}})
    return path


def resolve_init(ws, init: str) -> str | torch.Tensor:
    """'dim' / 'random' pass through; any other name is a direction file in R/directions (its unit rows)."""
    if init in ("dim", "random"):
        return init
    path = ws.run.direction_path(init)
    if not path.exists():
        raise ArtifactError(f"init {init!r} is neither 'dim', 'random' nor a direction file ({path} not found)")
    return DirectionSet.load(path).unit()


Trained = TypeVar("Trained", DirectionSet, list[DirectionSet])


def train_on_run(ws, name: str, train: Callable[[TrainingSetup, TrainConfig], Trained], *, n_train: int = 64,
                 n_val: int = 16, target_tokens: int = 30, cfg: TrainConfig | None = None) -> Trained:
    """Prepare the run's training setup, ``train(setup, cfg)`` timed as directions_<name>, and save.

    ``cfg`` defaults to the run's seed. Training checkpoints every step to R/checkpoints/<name>/, so
    rerunning after a crash resumes where it stopped (see directions/checkpoint.py). A list (a cone sweep) is saved as <name>_k<k> each, and the
    last one also as <name>.
    """
    cfg = cfg or TrainConfig(seed=ws.cfg.seed)
    setup = prepare_training(ws, n_train=n_train, n_val=n_val, target_tokens=target_tokens,
                             kl_weight=cfg.val_kl_weight)
    with ws.timed(f"directions_{name}"), checkpointing(ws.run / "checkpoints" / name, setup.provenance):
        trained = train(setup, cfg)
    if isinstance(trained, list):
        for direction in trained:
            save_direction(ws, direction, f"{name}_k{len(direction)}")
        save_direction(ws, trained[-1], name)
    else:
        save_direction(ws, trained, name)
    return trained
