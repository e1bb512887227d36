"""Refusal cones (RCO, Wollschläger et al. 2025): a k-dimensional orthonormal basis B whose whole
positive span mediates refusal.

Directions of the cone are r = sᵀB with s uniform on the positive orthant of the unit sphere
S^{k−1} (s = |z|/‖z‖, z ~ N(0, I_k): the Gaussian is rotation invariant, and folding it into the
orthant is a measure-preserving reflection, so s is exactly uniform there; since B is orthonormal,
r is a unit vector). Training minimizes the RDO losses on sampled directions and on the basis
vectors themselves (which the paper found stabilizes training and lifts the worst case).

Cost: every micro-batch of a step is paired with ONE direction, alternating a fresh cone sample
and the next basis vector (round-robin), so a step costs what an RDO step costs and the gradient is
an unbiased estimate of ½(E_s L(sᵀB) + mean_i L(b_i)). The seed evaluates 8 samples + k basis
vectors on every example (8 + k times the cost) and sums the two terms; Adam is invariant to the
factor ½.

Model selection uses the validation objective averaged over a fixed set of cone samples plus the
basis vectors. A dimension sweep k = k_min..k_max warm-starts each basis from the best basis of
dimension k−1 (the new vector is random, made orthogonal to the others).

Saved as a DirectionSet with method "cone": vectors = α·B (α = ‖r_DIM‖ in meta["alpha"]), ids =
basis indices; divide by α to get the orthonormal basis. ``workflows.gradient.cone_step`` also scores a fresh set of
cone samples on held-out harmful prompts (the run's first evaluation set, which training and
validation never see) and stores that distribution in meta["sample_eval"]; the sample directions
themselves are not stored, they are reproducible from meta["sample_eval"]["seed"] with
:func:`sample_cone`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.losses import LossWeights, direction_loss
from refusal_atlas.directions.optim import (TrainConfig, TrainedEstimator, orthonormal_rows, start_training,
                                            train_directions)
from refusal_atlas.directions.training_setup import TrainingSetup
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.refusal import mean_refusal_score
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter


def sample_orthant(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, k] points uniform on the positive orthant of the unit sphere S^{k−1}."""
    if k < 1 or n < 1:
        raise ConfigError(f"need n >= 1 samples of dimension k >= 1, got n={n}, k={k}")
    z = torch.randn(n, k, generator=generator, dtype=torch.float64).abs()
    return z / z.norm(dim=1, keepdim=True)


def sample_cone(basis: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, d] unit directions drawn uniformly from the cone spanned (nonnegatively) by ``basis`` rows."""
    b = basis.reshape(-1, basis.shape[-1])
    s = sample_orthant(n, b.shape[0], generator).to(b.dtype)
    r = s @ b
    return r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)


def check_cone_dim(k: int, d_model: int) -> int:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"cone dimension must be an integer >= 1, got {k!r}")
    if k > d_model:
        raise ConfigError(f"cone dimension {k} exceeds the model's d_model={d_model}")
    return k


def _initial_basis(k: int, dim: DirectionSet, warm: torch.Tensor | None, init: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, dim.d_model, generator=g)
    if warm is not None:
        warm = warm.reshape(-1, dim.d_model).to(torch.float32)
        if warm.shape[0] >= k:
            raise ConfigError(f"a warm start for dimension {k} needs at most {k - 1} vectors, got {warm.shape[0]}")
        rows[: warm.shape[0]] = warm
    elif init == "dim":
        rows[0] = dim.unit()[0]
    elif init != "random":
        raise ConfigError(f"unknown init {init!r}; choose 'dim' or 'random'")
    return orthonormal_rows(rows)


def train_cone(
    adapter: ModelAdapter,
    setup: TrainingSetup,
    k: int,
    *,
    warm_start: torch.Tensor | None = None,
    init: str = "dim",
    n_val_samples: int = 4,
    weights: LossWeights = LossWeights(),
    cfg: TrainConfig | None = None,
) -> DirectionSet:
    """Train a k-dimensional cone basis (see the module docstring for the sampling scheme)."""
    cfg, dim, alpha, layer = start_training(adapter, setup.dim, cfg)
    check_cone_dim(k, dim.d_model)
    data, val = setup.data, setup.val
    start = _initial_basis(k, dim, warm_start, init, cfg.seed + k)
    n_slots = -(-cfg.batch_size // cfg.micro_batch)
    val_s = sample_orthant(n_val_samples, k, torch.Generator().manual_seed(cfg.seed + 1000 + k)).to(torch.float32)

    def direction_for(param: torch.Tensor, slot: int, step: int) -> torch.Tensor:
        c = (step - 1) * n_slots + slot
        if c % 2 == 1 or k == 1:
            return param[(c // 2) % k]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * step + slot)
        s = sample_orthant(1, k, g).to(param.dtype)
        return (s @ param)[0]

    def loss_fn(param: torch.Tensor, idx: list[int], slot: int, step: int):
        return direction_loss(adapter, data.batches(idx), direction_for(param, slot, step), alpha, layer, weights)

    def validate(params: torch.Tensor) -> dict[str, Any]:
        dirs = torch.cat([val_s @ params, params]) if k > 1 else params
        return val.score(dirs / dirs.norm(dim=1, keepdim=True))

    result = train_directions(start, loss_fn, len(data), validate, cfg, desc=f"cone k={k}")
    meta = {
        "alpha": alpha, "vectors": "alpha * orthonormal basis", "k": k, "dim_layer": layer,
        "init": "warm start" if warm_start is not None else init, "loss_weights": weights.__dict__,
        "train": cfg.to_json(), "n_train_examples": len(data),
        "masked_targets": data.n_masked, "n_val_samples": n_val_samples,
        "sampling": "uniform on the positive orthant of S^{k-1} (|N(0,I)| normalized)",
        "basis_cos_with_dim": (result.params @ dim.unit()[0]).tolist(), **result.meta(), **setup.provenance,
    }
    return DirectionSet(alpha * result.params, layer, "cone", position=None, meta=meta)


def sweep_cones(
    adapter: ModelAdapter,
    setup: TrainingSetup,
    k_max: int,
    *,
    k_min: int = 2,
    warm_start: torch.Tensor | None = None,
    on_cone: Callable[[DirectionSet], None] | None = None,
    **kw: Any,
) -> list[DirectionSet]:
    """Cones of dimension k_min..k_max, each warm-started from the previous one's best basis.

    ``on_cone`` sees each cone as soon as it is trained (to evaluate and save it), so a crash late
    in a long sweep keeps the dimensions already done.
    """
    dim = setup.dim
    check_cone_dim(k_min, dim.d_model)
    check_cone_dim(k_max, dim.d_model)
    if k_min > k_max:
        raise ConfigError(f"k_min={k_min} is larger than k_max={k_max}")
    cones: list[DirectionSet] = []
    for k in range(k_min, k_max + 1):
        warm = cones[-1].unit() if cones else warm_start
        if warm is not None and warm.reshape(-1, dim.d_model).shape[0] >= k:
            warm = warm.reshape(-1, dim.d_model)[: k - 1]
        cones.append(train_cone(adapter, setup, k, warm_start=warm, **kw))
        if on_cone is not None:
            on_cone(cones[-1])
    return cones


class RefusalCone(TrainedEstimator):
    """A refusal cone as an estimator: ``RefusalCone(k=3).fit(adapter, setup)``.

    ``k_min`` < ``k`` sweeps the dimensions k_min..k, each warm-started from the one before
    (:func:`sweep_cones`); ``cones_`` holds them all, ``directions_`` (and the training record of
    :class:`TrainedEstimator`) the k-dimensional one. ``warm_start``: [m, d] rows the first basis
    starts from (its first k_min − 1 rows at most); without it, ``init`` "dim" | "random".
    """

    fitted_attributes = TrainedEstimator.fitted_attributes + ("cones_",)

    def __init__(self, *, k: int = 2, k_min: int | None = None, init: str = "dim",
                 warm_start: torch.Tensor | None = None, n_val_samples: int = 4,
                 weights: LossWeights = LossWeights(), cfg: TrainConfig | None = None):
        self.k = k
        self.k_min = k_min
        self.init = init
        self.warm_start = warm_start
        self.n_val_samples = n_val_samples
        self.weights = weights
        self.cfg = cfg

    def fit(self, adapter: ModelAdapter, setup: TrainingSetup) -> RefusalCone:
        self.cones_ = sweep_cones(adapter, setup, self.k, k_min=self.k if self.k_min is None else self.k_min,
                                  warm_start=self.warm_start, init=self.init, n_val_samples=self.n_val_samples,
                                  weights=self.weights, cfg=self.cfg)
        self._set_fitted(self.cones_[-1])
        return self


def cone_eval_directions(basis: torch.Tensor, n_samples: int, n_random: int, seed: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cone samples [n_samples, d] and random unit directions [n_random, d] that
    :func:`evaluate_cone` scores for ``seed`` (so a caller can reuse exactly those)."""
    gen = torch.Generator().manual_seed(seed)
    samples = sample_cone(basis, n_samples, gen)
    return samples, torch.nn.functional.normalize(torch.randn(n_random, basis.shape[-1], generator=gen), dim=1)


def evaluate_cone(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    cone: DirectionSet,
    harmful: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    n_samples: int = 16,
    n_random: int = 0,
    seed: int = 42,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Distribution over ``n_samples`` cone directions of the mean ablation refusal score on ``harmful``.

    Lower is better (less refusal). Also scores each basis vector, the unablated model and
    ``n_random`` random unit directions (the reference a cone must beat). Samples are reproducible
    from (basis, seed).
    """
    basis = cone.unit()
    samples, randoms = cone_eval_directions(basis, n_samples, n_random, seed)

    def mean_score(direction: torch.Tensor | None) -> float:
        spec = None if direction is None else DirectionalAblation.from_directions(direction.reshape(1, -1),
                                                                                  label="cone-eval")
        return mean_refusal_score(adapter, chat, harmful, refusal_ids, spec, batch_size)

    scores = [mean_score(s) for s in samples]
    return {"k": len(cone), "n_samples": n_samples, "seed": seed, "n_prompts": len(harmful),
            "sample_scores": scores, "min": min(scores), "median": statistics.median(scores),
            "max": max(scores), "basis_scores": [mean_score(b) for b in basis],
            "random_scores": [mean_score(r) for r in randoms], "baseline_score": mean_score(None)}
