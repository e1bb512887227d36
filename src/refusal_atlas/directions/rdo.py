"""Refusal Direction Optimization (RDO, Wollschläger et al. 2025) and its orthogonal variant RDO⊥.

A single unit direction r is trained so that (1) ablating it makes the model answer harmful
prompts the way DIM ablation does (t_answer), (2) adding α·r̂ at the DIM layer makes it refuse
harmless prompts (t_refusal), and (3) ablating it leaves harmless behaviour alone (t_retain).
The frozen model's weights get no gradient; r is the only parameter.

Differences from the seed code (see directions/optim.py for the loop): batched losses with left
padding instead of batch 1; the best iterate is chosen on held-out validation prompts, not by the
noisy training loss; initialization from DIM is offered (and is the default here, since on a small
CPU budget it starts from a working direction) as well as the paper's random init; the retain KL
is KL(base ‖ ablated) averaged over target tokens (see directions/losses.py).

Saved vectors are α·r̂ (α = ‖r_DIM‖, recorded in meta["alpha"]) so that, like DIM, the stored
norm is the ActAdd strength; ablation only uses the direction.
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.losses import LossWeights, direction_loss
from refusal_atlas.directions.optim import TrainConfig, TrainingData, ValidationSet, train_directions
from refusal_atlas.errors import ConfigError
from refusal_atlas.model.adapter import ModelAdapter


def initial_direction(init: str | torch.Tensor, dim: DirectionSet, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``"dim"`` (the DIM direction), ``"random"`` (seeded Gaussian) or an explicit [d] / [1, d] vector."""
    if isinstance(init, torch.Tensor):
        vec = init.reshape(-1, dim.d_model)[:1].to(torch.float32)
        return vec, "given"
    if init == "dim":
        return dim.unit()[:1].to(torch.float32), "dim"
    if init == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, dim.d_model, generator=g), "random"
    raise ConfigError(f"unknown init {init!r}; choose 'dim', 'random' or pass a vector")


def check_dim(dim: DirectionSet | None, adapter: ModelAdapter) -> DirectionSet:
    if dim is None:
        raise ConfigError("the gradient methods need the DIM direction (for α, the layer and the targets)")
    if dim.d_model != adapter.d_model:
        raise ConfigError(f"DIM direction has d={dim.d_model} but the model has d_model={adapter.d_model}")
    adapter.check_layer(dim.layer, "DIM layer")
    return dim


def train_rdo(
    adapter: ModelAdapter,
    dim: DirectionSet,
    data: TrainingData,
    val: ValidationSet,
    *,
    init: str | torch.Tensor = "dim",
    orthogonal_to: torch.Tensor | None = None,
    weights: LossWeights = LossWeights(),
    cfg: TrainConfig | None = None,
    provenance: dict[str, Any] | None = None,
) -> DirectionSet:
    """Train one refusal direction; ``orthogonal_to`` [m, d] makes it RDO⊥ (kept ⊥ to their span)."""
    cfg = cfg or TrainConfig()
    dim = check_dim(dim, adapter)
    alpha, layer = float(dim.norms[0]), dim.layer
    start, init_name = initial_direction(init, dim, cfg.seed)
    constraint = None
    if orthogonal_to is not None:
        constraint = orthogonal_to.reshape(-1, dim.d_model).to(torch.float32)
        if init_name == "dim":
            raise ConfigError("RDO⊥ cannot start from the DIM direction (it lies in the excluded span); "
                              "use init='random'")

    def loss_fn(param: torch.Tensor, idx: list[int], slot: int, step: int):
        return direction_loss(adapter, data.batches(idx), param[0], alpha, layer, weights)

    method = "rdo_orth" if constraint is not None else "rdo"
    result = train_directions(start, loss_fn, len(data), val.score, cfg, constraint=constraint, desc=method)
    meta = {
        "alpha": alpha, "vectors": "alpha * unit direction", "init": init_name, "dim_layer": layer,
        "loss_weights": weights.__dict__, "train": cfg.to_json(), "n_train_examples": len(data),
        "masked_targets": data.n_masked,
        "val": {"n_harmful": len(val.harmful), "n_harmless": len(val.harmless), "kl_weight": val.kl_weight},
        "cos_with_dim": float(result.params[0] @ dim.unit()[0]),
        **result.meta(), **(provenance or {}),
    }
    if constraint is not None:
        meta["orthogonal_to_rank"] = int(constraint.shape[0])
        meta["max_abs_cos_with_excluded"] = float((torch.nn.functional.normalize(constraint, dim=1)
                                                   @ result.params[0]).abs().max())
    return DirectionSet(alpha * result.params, layer, method, position=None, meta=meta)


def rdo_step(ws, *, name: str | None = None, init: str | None = None, orthogonal: bool = False, n_train: int = 64,
             n_val: int = 16, target_tokens: int = 30, weights: LossWeights = LossWeights(),
             cfg: TrainConfig | None = None) -> DirectionSet:
    """Train RDO (or RDO⊥ to DIM) on a run directory and save R/directions/<name>.safetensors."""
    from refusal_atlas.directions.optim import prepare_training, resolve_init, save_direction

    cfg = cfg or TrainConfig(seed=ws.cfg.seed)
    name = name or ("rdo_orth" if orthogonal else "rdo")
    start = resolve_init(ws, init or ("random" if orthogonal else "dim"))
    setup = prepare_training(ws, n_train=n_train, n_val=n_val, target_tokens=target_tokens,
                             kl_weight=cfg.val_kl_weight)
    with ws.timed(f"directions_{name}"):
        direction = train_rdo(ws.adapter, setup.dim, setup.data, setup.val, init=start, weights=weights, cfg=cfg,
                              orthogonal_to=setup.dim.vectors if orthogonal else None,
                              provenance=setup.provenance)
    save_direction(ws, direction, name)
    return direction
