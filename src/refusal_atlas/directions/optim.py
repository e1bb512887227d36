"""The training loop shared by RDO, cones, RepInd and the ARA-style edit: (Riemannian) AdamW, checkpointed.

:func:`train_parameters` is the loop for any parameter tensor, with an optional geometry (a gradient
projection and a retraction); :func:`train_directions` runs it on orthonormal directions, and the
low-rank edit (directions/ara.py) on its flattened factors with no geometry (plain AdamW). For the
directions the parameters are k orthonormal rows B [k, d] (k = 1 for RDO/RepInd), optionally constrained to
be orthogonal to a fixed set A (RDO⊥). Each step:

1. the step's batch is split into micro-batches; each micro-batch loss is scaled by its share of
   the batch before ``backward``, so the gradient is the average over examples (the seed's RepInd
   summed snapshots of the running gradient instead, over-weighting early examples);
2. the Euclidean gradient is projected onto the tangent space of the constraint set: off span(A),
   then G ← G − sym(G Bᵀ) B (the Stiefel projection; for k = 1 this is g − (g·r) r);
3. gradient clipping, AdamW (lr 1e-2, betas (0.9, 0.98), amsgrad, no weight decay);
4. retraction: project off span(A) and re-orthonormalize (QR with a sign fix = Gram–Schmidt in
   index order; for k = 1, renormalize).

Model selection is by a *validation* signal evaluated every ``eval_every`` steps (and on the
initial iterate): mean refusal score under ablation on harmful val prompts + ``val_kl_weight`` ×
next-token KL on harmless val prompts. The seed keeps the iterate with the lowest training loss,
which is measured on a different mini-batch at every step and so mostly rewards easy batches.
The same validation signal drives plateau learning-rate reduction and early stopping.

A non-finite loss stops training and keeps the best validated iterate (flagged in the result); at
the very first step it is an error, since nothing was learned.

The start every method shares (:func:`check_dim`, :func:`start_training`, :func:`initial_direction`)
is here too; reading and writing run directories is in workflows/gradient.py, which this
module does not import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from refusal_atlas.core.crashpoints import crash_point
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.checkpoint import checkpoint_key, load_checkpoint, next_checkpoint, save_checkpoint
from refusal_atlas.directions.losses import StepBatches, collate, tokenize_examples
from refusal_atlas.directions.targets import Targets
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.estimator import Estimator
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.evaluation.refusal import is_refusal
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.core.progress import progress


@dataclass
class TrainConfig:
    """Optimizer and model-selection settings (defaults: the seed's AdamW, a CPU-sized budget).

    ``val_kl_weight`` = 10 prices a KL rise of 0.1 nat on harmless prompts like one unit of
    refusal log-odds on harmful ones.
    """

    steps: int = 40
    batch_size: int = 8
    micro_batch: int = 4
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.98)
    amsgrad: bool = True
    clip: float | None = 10.0
    eval_every: int = 4
    patience: int = 3  # validations without improvement before the lr is cut
    n_lr_reduce: int = 2
    lr_factor: float = 0.1
    val_kl_weight: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.micro_batch > self.batch_size:
            self.micro_batch = self.batch_size

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------ data
class TrainingData:
    """Tokenized targets; ``batches(idx)`` collates example ``i`` of each role into StepBatches.

    With ``check_targets`` (default) a target that does not show the behaviour it stands for is
    masked out (empty target, no loss): a t_answer the substring judge calls a refusal (the model
    still refused with DIM ablated) and a t_refusal it does not (ActAdd did not induce refusal on
    that prompt). The seed trains on them anyway, which pulls the direction the wrong way. The
    shorter prompt list is cycled, so every prompt of the longer one is used.
    """

    def __init__(self, chat: ChatFormatter, targets: Targets, device: torch.device | str = "cpu",
                 check_targets: bool = True):
        answer, refusal = list(targets.answer), list(targets.refusal)
        self.n_masked = {"answer": 0, "refusal": 0}
        if check_targets:
            self.n_masked = {"answer": sum(map(is_refusal, answer)),
                             "refusal": sum(not is_refusal(t) for t in refusal)}
            answer = ["" if is_refusal(t) else t for t in answer]
            refusal = [t if is_refusal(t) else "" for t in refusal]
            for role, n in self.n_masked.items():
                if n == len(answer if role == "answer" else refusal):
                    warnings.warn(f"every t_{role} target was masked (none shows the intended behaviour); "
                                  f"the {'ablation' if role == 'answer' else 'addition'} loss will be zero",
                                  stacklevel=2)
        self.answer = tokenize_examples(chat, targets.harmful, answer)
        self.refusal = tokenize_examples(chat, targets.harmless, refusal)
        self.retain = tokenize_examples(chat, targets.harmless, targets.retain)
        self.n = max(len(self.answer), len(self.refusal))
        pad = chat.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else chat.tokenizer.eos_token_id)
        self.device = device

    def __len__(self) -> int:
        return self.n

    def batches(self, idx: Sequence[int]) -> StepBatches:
        def pick(examples):
            return [examples[i % len(examples)] for i in idx]

        # masked t_refusal rows would cost a forward pass for nothing; answer rows stay aligned
        # with ``idx`` because RepInd reads per-example states from them
        refusal = [e for e in pick(self.refusal) if e.target_ids]
        return StepBatches(collate(pick(self.answer), self.pad_id, self.device),
                           collate(refusal, self.pad_id, self.device) if refusal else None,
                           collate(pick(self.retain), self.pad_id, self.device))


class Sampler:
    """Shuffled passes over the examples; a step's batch may straddle two passes."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen, self.order = n, torch.Generator().manual_seed(seed), []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.order.pop())
        return out


# ------------------------------------------------------------------------------------ validation
class ValidationSet:
    """Cheap validation signal: the search's objective per direction, combined with a KL weight."""

    def __init__(self, adapter: ModelAdapter, chat: ChatFormatter, harmful: Sequence[str], harmless: Sequence[str],
                 refusal_ids: Sequence[int], batch_size: int = 16, kl_weight: float = 10.0):
        self.objective = ValidationObjective(adapter, chat, harmful, harmless, refusal_ids, batch_size=batch_size)
        self.harmful, self.harmless = self.objective.harmful, self.objective.harmless
        self.batch_size, self.kl_weight = batch_size, kl_weight

    def score_one(self, direction: torch.Tensor) -> dict[str, float]:
        refusal, kl = self.objective(direction.detach().reshape(1, -1))
        return {"refusal": refusal, "kl": kl, "objective": refusal + self.kl_weight * kl}

    def score(self, directions: torch.Tensor) -> dict[str, Any]:
        """Mean of the per-direction objectives (each row ablated on its own)."""
        rows = [self.score_one(d) for d in directions.reshape(-1, directions.shape[-1])]
        out: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in ("refusal", "kl", "objective")}
        if len(rows) > 1:
            out["per_direction"] = rows
        return out


# ------------------------------------------------------------------------------------- geometry
def orthonormal_rows(m: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt in row order (QR with the sign fixed so row i keeps pointing along m_i)."""
    q, r = torch.linalg.qr(m.to(torch.float64).T)
    signs = torch.sign(r.diagonal())
    signs[signs == 0] = 1
    return (q * signs).T.to(m.dtype)


def remove_span(m: torch.Tensor, constraint: torch.Tensor | None) -> torch.Tensor:
    """m minus its component in span(constraint) (constraint rows orthonormal)."""
    if constraint is None:
        return m
    return m - (m @ constraint.T) @ constraint


def tangent_project(grad: torch.Tensor, params: torch.Tensor, constraint: torch.Tensor | None = None) -> torch.Tensor:
    """Riemannian gradient on {B: B Bᵀ = I, B Aᵀ = 0}: G − sym(G Bᵀ) B, then off span(A)."""
    g = remove_span(grad, constraint)
    gb = g @ params.T
    return g - 0.5 * (gb + gb.T) @ params


def retract(params: torch.Tensor, constraint: torch.Tensor | None = None) -> torch.Tensor:
    return orthonormal_rows(remove_span(params, constraint))


# ------------------------------------------------------------------------------------------ loop
LossFn = Callable[[torch.Tensor, list[int], int, int], tuple[torch.Tensor, dict[str, float]]]
ValidateFn = Callable[[torch.Tensor], dict[str, Any]]


@dataclass
class TrainResult:
    params: torch.Tensor  # best validated iterate ([k, d] orthonormal rows for directions)
    last: torch.Tensor  # last finite iterate
    best_step: int
    stopped: str  # "max_steps" | "plateau" | "nan_loss"
    history: dict[str, list[float]] = field(default_factory=dict)
    val_history: list[dict[str, Any]] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "stopped": self.stopped, "history": self.history,
                "val_history": self.val_history}


class TrainedEstimator(Estimator):
    """What a gradient estimator (RDO, a cone) knows after ``fit``, read off one training run's meta.

    ``directions_`` the trained DirectionSet; ``history_`` per step (``loss``, ``lr``, ``grad_norm``
    and each loss part), ``loss_curve_`` its training losses, ``validation_history_`` the validation
    scores (step 0 = the start), ``best_step_`` the validated iterate kept, ``stopped_`` why it stopped.
    """

    fitted_attributes = ("directions_", "history_", "loss_curve_", "validation_history_", "best_step_", "stopped_")

    def _set_fitted(self, directions: DirectionSet) -> None:
        self.directions_ = directions
        self.history_ = directions.meta["history"]
        self.loss_curve_ = list(self.history_["loss"])
        self.validation_history_ = directions.meta["val_history"]
        self.best_step_ = directions.meta["best_step"]
        self.stopped_ = directions.meta["stopped"]


def train_directions(
    init: torch.Tensor,
    loss_fn: LossFn,
    n_examples: int,
    validate: ValidateFn,
    cfg: TrainConfig,
    constraint: torch.Tensor | None = None,
    desc: str = "train",
) -> TrainResult:
    """Optimize orthonormal directions [k, d] by ``loss_fn(params, example_idx, slot, step)``.

    ``slot`` numbers the micro-batches within a step (cones use it to pick a direction).
    """
    if n_examples < 1:
        raise ConfigError("training needs at least one example")
    if constraint is not None:
        constraint = orthonormal_rows(constraint.to(torch.float32))
    raw = remove_span(init.detach().to(torch.float32).reshape(-1, init.shape[-1]), constraint)
    diag = torch.linalg.qr(raw.to(torch.float64).T)[1].diagonal().abs() if torch.isfinite(raw).all() else None
    if diag is None or diag.min() <= 1e-4 * init.detach().norm(dim=-1).max().clamp_min(1e-30):
        raise ConfigError("initial directions are degenerate (zero, NaN, linearly dependent, or inside the "
                          "span they must be orthogonal to)")
    return train_parameters(retract(raw, constraint), loss_fn, n_examples, validate, cfg, desc=desc,
                            project=lambda grad, param: tangent_project(grad, param, constraint),
                            retraction=lambda param: retract(param, constraint), constraint=constraint)


def train_parameters(
    start: torch.Tensor,
    loss_fn: LossFn,
    n_examples: int,
    validate: ValidateFn,
    cfg: TrainConfig,
    *,
    desc: str = "train",
    project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    retraction: Callable[[torch.Tensor], torch.Tensor] | None = None,
    constraint: torch.Tensor | None = None,
) -> TrainResult:
    """AdamW on one parameter tensor from ``start`` by ``loss_fn(param, example_idx, slot, step)``, validated,
    checkpointed after every step inside :func:`~refusal_atlas.directions.checkpoint.checkpointing`.

    ``project(grad, param)`` maps the gradient before clipping and the step (a tangent space), ``retraction``
    maps the iterate after it (back onto a constraint set); both default to nothing (Euclidean). ``constraint``
    only enters the checkpoint key.
    """
    if n_examples < 1:
        raise ConfigError("training needs at least one example")
    param = torch.nn.Parameter(start.detach().clone())
    opt = torch.optim.AdamW([param], lr=cfg.lr, betas=cfg.betas, weight_decay=0.0, amsgrad=cfg.amsgrad)
    sampler = Sampler(n_examples, cfg.seed)
    ckpt = next_checkpoint()
    key = ckpt and checkpoint_key(ckpt[1], cfg.to_json(), desc, n_examples, start, constraint, loss_fn)
    saved = load_checkpoint(ckpt[0], key) if ckpt else None
    if saved is not None:
        tensors, st, opt_state = saved
        if st["stopped"] is not None:  # finished before: nothing to recompute
            return TrainResult(tensors["best"], tensors["last_good"], st["best_step"], st["stopped"],
                               st["history"], st["val_history"])
        with torch.no_grad():
            param.copy_(tensors["param"])
        opt.load_state_dict(opt_state)
        sampler.gen.set_state(tensors["sampler_rng"])
        sampler.order, history, val_history = st["sampler_order"], st["history"], st["val_history"]
        best, last_good = tensors["best"], tensors["last_good"]
        best_obj, best_step, stale, n_reduced, first_step = (st["best_obj"], st["best_step"], st["stale"],
                                                             st["n_reduced"], st["step"] + 1)
    else:
        history = {"loss": [], "lr": [], "grad_norm": []}
        first = validate(param.detach())
        val_history = [{"step": 0, **first}]
        best_obj, best_step, best = first["objective"], 0, param.detach().clone()
        last_good, stale, n_reduced, first_step = param.detach().clone(), 0, 0, 1
    stopped = "max_steps"

    def save(step: int, done: str | None) -> None:
        if ckpt:
            state = {"step": step, "stopped": done, "best_obj": best_obj, "best_step": best_step, "stale": stale,
                     "n_reduced": n_reduced, "history": history, "val_history": val_history,
                     "sampler_order": sampler.order}
            save_checkpoint(ckpt[0], key, {"param": param.detach(), "best": best, "last_good": last_good,
                                           "sampler_rng": sampler.gen.get_state()}, state, opt)

    micro = [cfg.micro_batch] * (cfg.batch_size // cfg.micro_batch)
    if cfg.batch_size % cfg.micro_batch:
        micro.append(cfg.batch_size % cfg.micro_batch)
    with progress(cfg.steps, desc) as bar:
        bar.update(first_step - 1)
        for step in range(first_step, cfg.steps + 1):
            opt.zero_grad(set_to_none=True)
            total, parts = 0.0, {}
            for slot, size in enumerate(micro):
                loss, p = loss_fn(param, sampler.take(size), slot, step)
                if not torch.isfinite(loss):
                    total = float("nan")
                    break
                (loss * (size / cfg.batch_size)).backward()
                total += float(loss.detach()) * size / cfg.batch_size
                for k, v in p.items():
                    parts[k] = parts.get(k, 0.0) + v * size / cfg.batch_size
            grad = param.grad
            if not math.isfinite(total) or grad is None or not torch.isfinite(grad).all():
                if step == 1:
                    raise ConfigError(f"{desc}: the loss or its gradient is NaN/inf at the first step; check the "
                                      "targets (empty?), the model dtype (fp16 overflows?) and the loss weights")
                warnings.warn(f"{desc}: non-finite loss at step {step}; stopping and keeping the best iterate",
                              stacklevel=2)
                stopped = "nan_loss"
                break
            with torch.no_grad():
                param.grad = project(grad, param.detach()) if project is not None else grad
                gnorm = float(param.grad.norm())
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_([param], cfg.clip)
            opt.step()
            with torch.no_grad():
                new = retraction(param.detach()) if retraction is not None else param.detach()
                if not torch.isfinite(new).all():
                    stopped = "nan_loss"
                    warnings.warn(f"{desc}: parameters became non-finite at step {step}; stopping", stacklevel=2)
                    break
                param.copy_(new)
                last_good = new.clone()
            history["loss"].append(total)
            history["lr"].append(opt.param_groups[0]["lr"])
            history["grad_norm"].append(gnorm)
            for k, v in parts.items():
                history.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if not (step % cfg.eval_every and step != cfg.steps):
                val = validate(param.detach())
                val_history.append({"step": step, **val})
                if val["objective"] < best_obj:
                    best_obj, best_step, best, stale = val["objective"], step, param.detach().clone(), 0
                else:
                    stale += 1
                    if stale >= cfg.patience and n_reduced >= cfg.n_lr_reduce:
                        stopped = "plateau"
                        break
                    if stale >= cfg.patience:
                        n_reduced, stale = n_reduced + 1, 0
                        for group in opt.param_groups:
                            group["lr"] *= cfg.lr_factor
            save(step, None)
            crash_point("train")
    save(cfg.steps, stopped)
    return TrainResult(best, last_good, best_step, stopped, history, val_history)


# ------------------------------------------------------------------------------- method helpers
def check_dim(dim: DirectionSet | None, adapter: ModelAdapter) -> DirectionSet:
    """The DIM direction, if it fits the model: every method takes α, the layer and its targets from it."""
    if dim is None:
        raise ConfigError("the gradient methods need the DIM direction (for α, the layer and the targets)")
    if dim.d_model != adapter.d_model:
        raise ConfigError(f"DIM direction has d={dim.d_model} but the model has d_model={adapter.d_model}")
    adapter.check_layer(dim.layer, "DIM layer")
    return dim


def start_training(adapter: ModelAdapter, dim: DirectionSet | None,
                   cfg: TrainConfig | None) -> tuple[TrainConfig, DirectionSet, float, int]:
    """The start every method shares: (cfg or the default, checked DIM direction, α = ‖r_DIM‖, DIM layer).

    α is the ActAdd strength of the saved vectors and the DIM layer is where they are added.
    """
    dim = check_dim(dim, adapter)
    return cfg or TrainConfig(), dim, float(dim.norms[0]), dim.layer


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
