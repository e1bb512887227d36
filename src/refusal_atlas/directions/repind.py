"""Representationally independent refusal directions (RepInd, Wollschläger et al. 2025).

Two directions r and v are representationally independent on a set of layers S when ablating one
does not change how strongly the other is expressed: at the last prompt token of each block input
l ∈ S (l < 0.9·L), cos(x_l, v) = cos(x_l^{−r}, v) and cos(x_l, r) = cos(x_l^{−v}, r), where x^{−u}
is the residual stream with u ablated everywhere (read after that layer's projection). The loss
adds, for every v in the independent set V (DIM and previously found RepInd directions),

    L_ind = mean_l [cos(x^{−r}_l, v) − cos(x_l, v)]² + mean_l [cos(x^{−v}_l, r) − cos(x_l, r)]²

with weight 200 to the RDO losses. New directions are found one at a time, each independent of
DIM and of all earlier ones; each is the best of ``restarts`` runs by the validation objective.

Gradients: x and x^{−v} do not depend on r, so they are computed once per prompt without a graph
(cached); x^{−r} comes for free from the ablation-CE forward pass (same harmful prompts, and the
last prompt token does not see the target tokens). The clean cosine cos(x_l, r) is NOT detached:
both cosines in the second term are explicit functions of r, and the term equals ((x̂^{−v} − x̂)·r̂)²,
so keeping both gives the exact gradient of the stated objective; detaching one would optimize a
target that moves every step. Validation adds the same weighted independence loss (on validation
prompts) to the refusal/KL objective, so the chosen iterate is independent, not just effective.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch

from refusal_atlas.model.activations import extract
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.losses import LossWeights, direction_loss
from refusal_atlas.directions.optim import TrainConfig, initial_direction, start_training, train_directions
from refusal_atlas.directions.training_setup import TrainingSetup
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.estimator import Estimator
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.hooks import Hooks


def independence_layers(n_layers: int, frac: float = 0.9) -> list[int]:
    """Block inputs 0 .. ⌊frac·L⌋−1 (the seed's cutoff 0.9)."""
    layers = list(range(int(n_layers * frac)))
    if not layers:
        raise ConfigError(f"layer fraction {frac} leaves no layers of {n_layers}")
    return layers


@torch.no_grad()
def last_token_reps(adapter: ModelAdapter, chat: ChatFormatter, prompts: Sequence[str], layers: Sequence[int],
                    ablated: torch.Tensor | None = None, batch_size: int = 16) -> torch.Tensor:
    """[N, |S|, d] block-input residuals at the last prompt token, optionally with ``ablated`` removed."""
    ctx = ablate(adapter, ablated.detach().reshape(1, -1)) if ablated is not None else nullcontext()
    with ctx:
        acts = extract(adapter, chat, list(prompts), layers=layers, positions=[-1], batch_size=batch_size,
                       desc="repind: representations")
    assert acts.last is not None
    return acts.last


def _cos(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (h @ (u / u.norm().clamp_min(1e-12))) / h.norm(dim=-1).clamp_min(1e-12)


def independence_loss(clean: torch.Tensor, minus_r: torch.Tensor, minus_v: torch.Tensor,
                      r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine change of v under r-ablation plus of r under v-ablation ([N, S, d] inputs)."""
    a = (_cos(minus_r, v) - _cos(clean, v)).pow(2).mean()
    b = (_cos(minus_v, r) - _cos(clean, r)).pow(2).mean()
    return a + b


@contextmanager
def capture_prompt_end(adapter: ModelAdapter, layers: Sequence[int], prompt_end: torch.Tensor,
                       store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record (with grad) each row's block input at ``prompt_end`` for ``layers``."""
    rows = torch.arange(prompt_end.shape[0], device=prompt_end.device)

    def make(layer: int):
        def fn(hidden: torch.Tensor) -> None:
            store[layer] = hidden[rows, prompt_end]

        return fn

    with Hooks() as hooks:
        for l in layers:
            hooks.inputs(adapter.layers[l], make(l))
        yield


def cross_ablation_change(adapter: ModelAdapter, chat: ChatFormatter, r: torch.Tensor, v: torch.Tensor,
                          prompts: Sequence[str], layers: Sequence[int] | None = None,
                          batch_size: int = 16) -> dict[str, Any]:
    """How much ablating r moves cos(·, v) and vice versa, per layer (mean over prompts)."""
    layers = list(layers) if layers is not None else independence_layers(adapter.n_layers)
    clean = last_token_reps(adapter, chat, prompts, layers, None, batch_size)
    minus_r = last_token_reps(adapter, chat, prompts, layers, r, batch_size)
    minus_v = last_token_reps(adapter, chat, prompts, layers, v, batch_size)
    v_under_r = (_cos(minus_r, v) - _cos(clean, v)).mean(0)
    r_under_v = (_cos(minus_v, r) - _cos(clean, r)).mean(0)
    return {"loss": float(independence_loss(clean, minus_r, minus_v, r, v)), "layers": layers,
            "mean_abs_change": float((v_under_r.abs().mean() + r_under_v.abs().mean()) / 2),
            "v_under_r_ablation": v_under_r.tolist(), "r_under_v_ablation": r_under_v.tolist(),
            "n_prompts": len(prompts)}


class _Reference:
    """Cached clean and v-ablated representations of a prompt set for every v in the independent set."""

    def __init__(self, adapter, chat, prompts: Sequence[str], layers, independent: list[torch.Tensor], batch_size):
        self.clean = last_token_reps(adapter, chat, prompts, layers, None, batch_size)
        self.minus_v = [last_token_reps(adapter, chat, prompts, layers, v, batch_size) for v in independent]

    def loss(self, idx, minus_r: torch.Tensor, r: torch.Tensor, independent: list[torch.Tensor]) -> torch.Tensor:
        return sum((independence_loss(self.clean[idx], minus_r, mv[idx], r, v)
                    for mv, v in zip(self.minus_v, independent)), r.new_zeros(()))


def train_repind(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    setup: TrainingSetup,
    *,
    n_directions: int = 1,
    restarts: int = 1,
    independence_weight: float = 200.0,
    layer_frac: float = 0.9,
    init: str | torch.Tensor = "random",
    orthogonal: bool = False,
    weights: LossWeights = LossWeights(),
    cfg: TrainConfig | None = None,
) -> DirectionSet:
    """Find ``n_directions`` directions, each independent of DIM and of the ones before it."""
    cfg, dim, alpha, layer = start_training(adapter, setup.dim, cfg)
    data, val, harmful_train = setup.data, setup.val, setup.targets.harmful
    if n_directions < 1 or restarts < 1:
        raise ConfigError(f"need n_directions >= 1 and restarts >= 1, got {n_directions}, {restarts}")
    if len(harmful_train) != len(data.answer):
        raise ConfigError("setup.data must be tokenized from setup.targets (one example per harmful prompt, "
                          "in the same order)")
    layers = independence_layers(adapter.n_layers, layer_frac)
    independent = [dim.unit()[0]]
    found, runs = [], []
    for n in range(n_directions):
        train_ref = _Reference(adapter, chat, harmful_train, layers, independent, val.batch_size)
        val_ref = _Reference(adapter, chat, val.harmful, layers, independent, val.batch_size)
        all_idx = list(range(len(val.harmful)))

        def loss_fn(param: torch.Tensor, idx: list[int], slot: int, step: int):
            batches, store = data.batches(idx), {}
            inner = lambda: capture_prompt_end(adapter, layers, batches.answer.prompt_end, store)  # noqa: E731
            total, parts = direction_loss(adapter, batches, param[0], alpha, layer, weights, inner=inner)
            minus_r = torch.stack([store[l] for l in layers], dim=1)
            rows = [i % len(harmful_train) for i in idx]
            ind = train_ref.loss(rows, minus_r, param[0], independent)
            return total + independence_weight * ind, {**parts, "independence": float(ind.detach())}

        def validate(params: torch.Tensor) -> dict[str, Any]:
            out = val.score(params)
            minus_r = last_token_reps(adapter, chat, val.harmful, layers, params[0], val.batch_size)
            ind = float(val_ref.loss(all_idx, minus_r, params[0], independent))
            out["independence"] = ind
            out["objective"] = out["objective"] + independence_weight * ind
            return out

        best, best_obj = None, float("inf")
        constraint = torch.stack(independent) if orthogonal else None
        for j in range(restarts):
            run_cfg = replace(cfg, seed=cfg.seed + 1000 * n + j)
            start, init_name = initial_direction(init, dim, run_cfg.seed)
            result = train_directions(start, loss_fn, len(data), validate, run_cfg, constraint=constraint,
                                      desc=f"repind {n + 1}/{n_directions} restart {j + 1}/{restarts}")
            obj = min(v["objective"] for v in result.val_history if v["step"] == result.best_step)
            runs.append({"direction": n, "restart": j, "seed": run_cfg.seed, "init": init_name,
                         "val_objective": obj, **result.meta()})
            if obj < best_obj:
                best, best_obj = result.params[0], obj
        assert best is not None
        found.append(best)
        independent.append(best)
    meta = {
        "alpha": alpha, "vectors": "alpha * unit direction", "dim_layer": layer, "independence_layers": layers,
        "independence_weight": independence_weight, "orthogonal": orthogonal, "restarts": restarts,
        "loss_weights": weights.__dict__, "train": cfg.to_json(), "n_train_examples": len(data),
        "masked_targets": data.n_masked,
        "cos_with_dim": [float(f @ dim.unit()[0]) for f in found], "runs": runs,
        "best_step": [r["best_step"] for r in runs if r["val_objective"] == min(
            q["val_objective"] for q in runs if q["direction"] == r["direction"])],
        "stopped": [r["stopped"] for r in runs], **setup.provenance,
    }
    return DirectionSet(alpha * torch.stack(found), layer, "repind", position=None, meta=meta)


class RepInd(Estimator):
    """RepInd as an estimator: ``RepInd(n_directions=2).fit(adapter, chat, setup)`` (parameters: :func:`train_repind`).

    After ``fit``: ``directions_`` (one row per direction, each independent of DIM and the rows
    before it), ``runs_`` (one record per direction and restart: seed, validation objective and its
    training history) and ``best_step_`` (the kept iterate of each direction's winning restart).
    """

    fitted_attributes = ("directions_", "runs_", "best_step_")

    def __init__(self, *, n_directions: int = 1, restarts: int = 1, independence_weight: float = 200.0,
                 layer_frac: float = 0.9, init: str | torch.Tensor = "random", orthogonal: bool = False,
                 weights: LossWeights = LossWeights(), cfg: TrainConfig | None = None):
        self.n_directions = n_directions
        self.restarts = restarts
        self.independence_weight = independence_weight
        self.layer_frac = layer_frac
        self.init = init
        self.orthogonal = orthogonal
        self.weights = weights
        self.cfg = cfg

    def fit(self, adapter: ModelAdapter, chat: ChatFormatter, setup: TrainingSetup) -> RepInd:
        self.directions_ = train_repind(adapter, chat, setup, **self.get_params())
        self.runs_, self.best_step_ = self.directions_.meta["runs"], self.directions_.meta["best_step"]
        return self
