"""The gradient methods on a run directory: what they train on, training plus saving, one job per method.

:func:`prepare_training` reads the run's DIM direction, builds or reuses R/targets.json and sets up
the training data and validation prompts (a :class:`TrainingSetup`, what every ``train_*`` takes);
:func:`train_on_run` is the body of every ``*_step``: prepare, train (timed), save to
R/directions. The estimators themselves (directions/rdo.py, cone.py, repind.py, optim.py) take a
model and a TrainingSetup and never see a run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from refusal_atlas.data import load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.checkpoint import checkpointing
from refusal_atlas.directions.cone import check_cone_dim, evaluate_cone, sweep_cones
from refusal_atlas.directions.losses import LossWeights
from refusal_atlas.directions.optim import TrainConfig, TrainingData, ValidationSet
from refusal_atlas.directions.rdo import train_rdo
from refusal_atlas.directions.repind import train_repind
from refusal_atlas.directions.targets import build_targets, direction_fingerprint
from refusal_atlas.directions.training_setup import TrainingSetup
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.settings import TrainingSettings
from refusal_atlas.workflows.run import filter_by_refusal


def load_dim(run_path) -> DirectionSet:
    """The run's selected DIM direction (R/directions/dim.safetensors) or a clear error."""
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
    if n_train < 2 or n_val < 1:
        raise ConfigError(f"need n_train >= 2 and n_val >= 1, got {n_train}, {n_val}")
    data, batch_size = ws.settings.data, ws.settings.model.batch_size
    dim = load_dim(ws.run.path)
    harmful, harmless = train_prompts(ws, n_train)
    targets = build_targets(ws.adapter, ws.chat, dim, harmful, harmless, max_new_tokens=target_tokens,
                            batch_size=batch_size, cache=ws.run / "targets.json")
    val = ValidationSet(ws.adapter, ws.chat, *val_prompts(ws, n_val), ws.refusal_ids, batch_size, kl_weight)
    model = ws.run.manifest().get("model", {})
    provenance = {"provenance": {
        "model": model.get("name", ws.loaded.name), "model_sha256": model.get("gguf_sha256"),
        "dim_fingerprint": direction_fingerprint(dim), "dim_layer": dim.layer, "dim_position": dim.position,
        "harmful_train": data.harmful_train, "harmless_train": data.harmless_train, "n_train_sampled": n_train,
        "filtered": data.filter_train, "n_harmful": len(targets.harmful), "n_harmless": len(targets.harmless),
        "harmful_val": data.harmful_val, "harmless_val": data.harmless_val, "n_val": n_val,
        "target_tokens": target_tokens, "targets": "targets.json", "seed": data.seed,
        "system_prompt": ws.settings.model.system_prompt}}
    return TrainingSetup(dim, targets, TrainingData(ws.chat, targets, ws.adapter.device), val, provenance)


def train_prompts(ws, n_train: int) -> tuple[list[str], list[str]]:
    """``n_train`` harmful and harmless train prompts (the run's sets and seed), filtered like the DIM step when
    the run filters: harmful prompts the model refuses, harmless ones it answers."""
    data = ws.settings.data
    harmful = load_prompts(data.harmful_train, n=n_train, seed=data.seed)
    harmless = load_prompts(data.harmless_train, n=n_train, seed=data.seed)
    if data.filter_train:
        harmful, harmless = filter_by_refusal(ws, harmful, harmless)
    return [p.instruction for p in harmful], [p.instruction for p in harmless]


def val_prompts(ws, n_val: int) -> tuple[list[str], list[str]]:
    """``n_val`` harmful and harmless validation prompts (model selection of the trained methods)."""
    data = ws.settings.data
    return tuple([p.instruction for p in load_prompts(name, n=n_val, seed=data.seed)]  # type: ignore[return-value]
                 for name in (data.harmful_val, data.harmless_val))


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


def train_config(training: TrainingSettings, seed: int, micro_batch: int = 4) -> TrainConfig:
    """The optimizer settings of a training section (``seed``/``micro_batch`` where it leaves them to the
    run and the method); a bad value fails here, before any model loads."""
    t = training
    return TrainConfig(steps=t.steps, batch_size=t.batch_size, micro_batch=micro_batch if t.micro_batch is None else t.micro_batch,
                        lr=t.lr,
                       eval_every=t.eval_every, patience=t.patience, val_kl_weight=t.val_kl_weight,
                       seed=seed if t.seed is None else t.seed)


def loss_weights(training: TrainingSettings) -> LossWeights:
    return LossWeights(training.ablation_weight, training.addition_weight, training.retain_weight)


def train_on_run(ws, name: str, train: Callable[[TrainingSetup, TrainConfig], Trained],
                 training: TrainingSettings | None = None, micro_batch: int = 4) -> Trained:
    """Prepare the run's training setup, ``train(setup, cfg)`` timed as directions_<name>, and save.

    ``training``: prompts, optimizer and seed (default: the section's defaults and the run's seed; a
    ``micro_batch`` left unset is the method's). Training checkpoints every step to R/checkpoints/<name>/, so
    rerunning after a crash resumes where it stopped (see directions/checkpoint.py). A list (a cone sweep) is
    saved as <name>_k<k> each, and the last one also as <name>.
    """
    training = training or TrainingSettings()
    cfg = train_config(training, ws.settings.data.seed, micro_batch)
    setup = prepare_training(ws, n_train=training.n_train, n_val=training.n_val,
                             target_tokens=training.target_tokens, kl_weight=cfg.val_kl_weight)
    with ws.timed(f"directions_{name}"), checkpointing(ws.run / "checkpoints" / name, setup.provenance):
        trained = train(setup, cfg)
    if isinstance(trained, list):
        for direction in trained:
            save_direction(ws, direction, f"{name}_k{len(direction)}")
        save_direction(ws, trained[-1], name)
    else:
        save_direction(ws, trained, name)
    return trained


# --- one function per method: train on the run and save (the `directions rdo|cone|repind` verbs) ---
def rdo_step(ws, training: TrainingSettings | None = None, *, name: str | None = None, init: str | None = None,
             orthogonal: bool = False) -> DirectionSet:
    """Train RDO (or RDO⊥ to DIM) on a run directory and save R/directions/<name>.safetensors."""
    name = name or ("rdo_orth" if orthogonal else "rdo")
    start = resolve_init(ws, init or ("random" if orthogonal else "dim"))

    weights = loss_weights(training or TrainingSettings())

    def train(setup: TrainingSetup, cfg: TrainConfig) -> DirectionSet:
        return train_rdo(ws.adapter, setup, init=start, weights=weights, cfg=cfg,
                         orthogonal_to=setup.dim.vectors if orthogonal else None)

    return train_on_run(ws, name, train, training)


def cone_step(ws, training: TrainingSettings | None = None, *, k_min: int = 2, k_max: int = 2, name: str = "cone",
              warm_start: str | None = None, init: str = "dim", n_val_samples: int = 4, n_eval_samples: int = 16,
              n_eval_prompts: int = 50) -> list[DirectionSet]:
    """Cone sweep on a run directory: R/directions/<name>_k<k>.safetensors each, <name> = the largest.

    Each cone is saved with the distribution of ``n_eval_samples`` sampled directions' ablation
    refusal scores on ``n_eval_prompts`` held-out harmful prompts (0 samples: skip). An unset
    ``training.micro_batch`` is 2 here: a cone's k directions share each forward pass.
    """
    check_cone_dim(k_min, ws.adapter.d_model)
    check_cone_dim(k_max, ws.adapter.d_model)
    warm = resolve_init(ws, warm_start) if warm_start else None
    if isinstance(warm, str):
        raise ConfigError("--warm-start takes a direction file name (e.g. rdo), not 'dim'/'random'; use --init")
    if n_eval_samples < 0 or n_eval_prompts < 1:
        raise ConfigError(f"need n_eval_samples >= 0 and n_eval_prompts >= 1, got {n_eval_samples}, {n_eval_prompts}")

    dataset = ws.settings.evaluation.eval_harmful[0]
    texts = [p.instruction for p in load_prompts(dataset, n=n_eval_prompts, seed=ws.settings.data.seed)]
    weights = loss_weights(training or TrainingSettings())

    def train(setup: TrainingSetup, cfg: TrainConfig) -> list[DirectionSet]:
        def finish(cone: DirectionSet) -> None:
            if n_eval_samples:
                cone.meta["sample_eval"] = {"dataset": dataset, **evaluate_cone(
                    ws.adapter, ws.chat, cone, texts, ws.refusal_ids, n_samples=n_eval_samples, n_random=4,
                    seed=cfg.seed + 42, batch_size=ws.settings.model.batch_size)}
            save_direction(ws, cone, f"{name}_k{len(cone)}")  # train_on_run saves them again, and <name>

        return sweep_cones(ws.adapter, setup, k_max, k_min=k_min, warm_start=warm, init=init, on_cone=finish,
                           n_val_samples=n_val_samples, weights=weights, cfg=cfg)

    return train_on_run(ws, name, train, training, micro_batch=2)


def repind_step(ws, training: TrainingSettings | None = None, *, name: str = "repind", n_directions: int = 1,
                restarts: int = 1, independence_weight: float = 200.0, init: str = "random",
                orthogonal: bool = False) -> DirectionSet:
    """RepInd on a run directory; saves R/directions/<name>.safetensors (one row per direction)."""
    start = resolve_init(ws, init)
    weights = loss_weights(training or TrainingSettings())

    def train(setup: TrainingSetup, cfg: TrainConfig) -> DirectionSet:
        return train_repind(ws.adapter, ws.chat, setup, n_directions=n_directions, restarts=restarts,
                            independence_weight=independence_weight, init=start, orthogonal=orthogonal,
                            weights=weights, cfg=cfg)

    return train_on_run(ws, name, train, training)
