"""Multinomial logistic regression with an L2 penalty, fitted in torch: the meaning judge's head.

WHY this and nothing bigger: the labelled set has a few hundred rows, so a linear read-out of fixed
sentence embeddings is what it can support without over-fitting, and its optimum is unique (the loss
is strictly convex for L2 > 0). Fitting is deterministic by construction, with no seed to forget:
zero initial weights, full-batch L-BFGS in float64, features standardised with the training rows'
mean and spread only. The L2 strength is picked by grouped cross-validation on the training part
(:func:`cross_validate`), never by the rows the head is measured on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class LogisticHead:
    """p(class | x) = softmax(W · (x − mean) / scale + b); tensors float32, ``classes`` in W's row order."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]
    classes: tuple[str, ...]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(torch.float64) - self.mean.to(torch.float64)) / self.scale.to(torch.float64)
        return torch.softmax(z @ self.weight.to(torch.float64).T + self.bias.to(torch.float64), dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}


def fit(x: torch.Tensor, y: Sequence[int], classes: Sequence[str], l2: float, max_iter: int = 500) -> LogisticHead:
    """Minimise mean cross-entropy + ``l2``/2 · ‖W‖² (bias not penalised) over standardised features."""
    x64 = x.to(torch.float64)
    mean = x64.mean(0)
    scale = x64.std(0, unbiased=False).clamp_min(1e-6)
    z = (x64 - mean) / scale
    target = torch.as_tensor(list(y), dtype=torch.long)
    weight = torch.zeros(len(classes), z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, target) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticHead(weight.detach().to(torch.float32), bias.detach().to(torch.float32),
                        mean.to(torch.float32), scale.to(torch.float32), tuple(classes))


def log_loss(head: LogisticHead, x: torch.Tensor, y: Sequence[int]) -> float:
    p = head.probabilities(x)[torch.arange(len(y)), torch.as_tensor(list(y), dtype=torch.long)]
    return float(-p.clamp_min(1e-12).log().mean())


def cross_validate(x: torch.Tensor, y: Sequence[int], folds: Sequence[int], classes: Sequence[str],
                   l2_grid: Sequence[float]) -> tuple[float, list[dict]]:
    """Pick the L2 strength with the lowest mean held-out log-loss over ``folds`` (a fold id per row).

    Rows of one fold are held out together (callers give every row of a prompt the same fold), so no
    prompt is on both sides. Ties go to the stronger penalty. Returns (best l2, one record per l2).
    """
    ids = sorted(set(folds))
    if len(ids) < 2:
        raise ValueError("cross-validation needs rows in at least two folds")
    fold_t = torch.as_tensor(list(folds))
    y_t = torch.as_tensor(list(y), dtype=torch.long)
    table = []
    for l2 in l2_grid:
        losses, correct = [], 0
        for f in ids:
            train, held = fold_t != f, fold_t == f
            head = fit(x[train], y_t[train].tolist(), classes, l2)
            losses.append(log_loss(head, x[held], y_t[held].tolist()) * int(held.sum()))
            correct += int((head.probabilities(x[held]).argmax(-1) == y_t[held]).sum())
        table.append({"l2": l2, "log_loss": sum(losses) / len(y), "accuracy": correct / len(y)})
    best = min(table, key=lambda r: (round(r["log_loss"], 12), -r["l2"]))
    if not math.isfinite(best["log_loss"]):
        raise ValueError("cross-validation gave no finite log-loss")
    return float(best["l2"]), table
