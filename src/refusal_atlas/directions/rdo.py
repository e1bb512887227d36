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

import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.losses import LossWeights, direction_loss
from refusal_atlas.directions.optim import (TrainConfig, TrainedEstimator, initial_direction, start_training,
                                            train_directions)
from refusal_atlas.directions.training_setup import TrainingSetup
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.model.adapter import ModelAdapter


def train_rdo(
    adapter: ModelAdapter,
    setup: TrainingSetup,
    *,
    init: str | torch.Tensor = "dim",
    orthogonal_to: torch.Tensor | None = None,
    weights: LossWeights = LossWeights(),
    cfg: TrainConfig | None = None,
) -> DirectionSet:
    """Train one refusal direction; ``orthogonal_to`` [m, d] makes it RDO⊥ (kept ⊥ to their span)."""
    cfg, dim, alpha, layer = start_training(adapter, setup.dim, cfg)
    data, val = setup.data, setup.val
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
        **result.meta(), **setup.provenance,
    }
    if constraint is not None:
        meta["orthogonal_to_rank"] = int(constraint.shape[0])
        meta["max_abs_cos_with_excluded"] = float((torch.nn.functional.normalize(constraint, dim=1)
                                                   @ result.params[0]).abs().max())
    return DirectionSet(alpha * result.params, layer, method, position=None, meta=meta)


class RDO(TrainedEstimator):
    """RDO as an estimator: ``RDO(cfg=TrainConfig(steps=40)).fit(adapter, setup)``.

    ``orthogonal=True`` trains RDO⊥, kept orthogonal to the setup's DIM direction. ``init``: "dim",
    "random" or a [d] tensor; None starts from DIM, or at random for RDO⊥ (the DIM direction lies in
    the span RDO⊥ must avoid). Fitted attributes: see :class:`TrainedEstimator`.
    """

    def __init__(self, *, init: str | torch.Tensor | None = None, orthogonal: bool = False,
                 weights: LossWeights = LossWeights(), cfg: TrainConfig | None = None):
        self.init = init
        self.orthogonal = orthogonal
        self.weights = weights
        self.cfg = cfg

    def fit(self, adapter: ModelAdapter, setup: TrainingSetup) -> RDO:
        init = self.init if self.init is not None else ("random" if self.orthogonal else "dim")
        self._set_fitted(train_rdo(adapter, setup, init=init, weights=self.weights, cfg=self.cfg,
                                   orthogonal_to=setup.dim.vectors if self.orthogonal else None))
        return self
