"""SOM directions (Piras et al., "SOM Directions are Better than One").

A self-organizing map is trained on the *harmful* per-prompt representations at one layer; each
neuron that wins at least one prompt becomes a direction ``neuron − harmless centroid``. The
neurons tile the harmful cluster, so the directions are local refusal directions whose
hit-weighted average is the difference-in-means vector (exactly so at a k-means fixed point).

Layer convention: ``layer`` is the input of decoder block ``layer`` (resid_pre), as everywhere in
refusal-atlas. The SOM paper's code reads block *outputs*, so its "layer l" is our ``l + 1``.

Training uses MiniSom (hexagonal grid, Gaussian neighbourhood, random data-point initialisation,
seeded), with the paper's defaults: 4×4, σ 0.33, learning rate 0.01, 10,000 online updates and
MiniSom's asymptotic decay η(t) = η₀/(1 + 2t/T). Two extra learning-rate schedules exist to make
the paper's "SOMs generalize difference-in-means" claim exact rather than approximate:

* ``lr_schedule="inverse"``: η_t = lr/(t+1). With lr = 1 and one neuron, the update
  w ← w + η_t (x_t − w) makes w the running mean of the samples seen (the first step overwrites
  the initialisation). The iteration count is rounded up to a multiple of the number of samples
  so that every sample is visited equally often, and the running mean is then the sample mean.
* ``lr_schedule="constant"`` with ``training="batch"`` and lr = 1: each epoch sets every neuron to
  the Gaussian-weighted mean of the samples; as σ → 0 that is Lloyd's k-means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from refusal_atlas.model.activations import Activations, ActivationSet
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.estimator import Estimator

LrSchedule = Literal["asymptotic", "inverse", "constant"]
Training = Literal["online", "batch"]
LAYER_CONVENTION = "block input (resid_pre); the SOM paper's layer l (block output) is our l+1"


def _inverse_decay(learning_rate: float, t: int, max_iter: int) -> float:
    """η_t = lr/(t+1): with lr = 1 a one-neuron SOM computes the running mean exactly."""
    return learning_rate / (t + 1)


def _constant_decay(learning_rate: float, t: int, max_iter: int) -> float:
    return learning_rate


def parse_grid(text: str) -> tuple[int, int]:
    """'4x4' → (4, 4)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"SOM grid must look like 4x4, got {text!r}") from None
    if len(grid) != 2:
        raise ConfigError(f"SOM grid must look like 4x4, got {text!r}")
    return grid[0], grid[1]


@dataclass
class SomDirections:
    """Sklearn-like SOM direction builder: ``SomDirections(...).fit(harmful, harmless, layer)``.

    After ``fit``: ``som_`` (the trained MiniSom), ``hits_`` [x, y] hit counts,
    ``quantization_error_`` and ``directions_`` (the returned DirectionSet).
    """

    grid: tuple[int, int] = (4, 4)
    sigma: float = 0.33
    lr: float = 0.01
    iterations: int = 10_000
    seed: int = 0
    lr_schedule: LrSchedule = "asymptotic"
    training: Training = "online"

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)  # type: ignore[assignment]
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ConfigError(f"SOM grid must be at least 1x1, got {'x'.join(map(str, self.grid))}")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ConfigError(f"SOM sigma must be a positive number, got {self.sigma}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"SOM learning rate must be a positive number, got {self.lr}")
        if self.iterations < 1:
            raise ConfigError(f"SOM iterations must be >= 1, got {self.iterations}")
        if self.lr_schedule not in ("asymptotic", "inverse", "constant"):
            raise ConfigError(f"unknown SOM lr_schedule {self.lr_schedule!r} (asymptotic, inverse, constant)")
        if self.training not in ("online", "batch"):
            raise ConfigError(f"unknown SOM training {self.training!r} (online, batch)")

    # ------------------------------------------------------------------------------------------
    def fit(self, harmful: ActivationSet, harmless: ActivationSet, layer: int) -> DirectionSet:
        """Train on ``harmful.last_at(layer)``; directions = live neurons − harmless mean (pos -1)."""
        for name, acts in (("harmful", harmful), ("harmless", harmless)):
            if layer not in acts.layers:
                raise ConfigError(f"layer {layer} is not in the {name} representations "
                                  f"(layers {acts.layers[0]}..{acts.layers[-1]})")
        if -1 not in harmless.positions:
            raise ConfigError("the harmless representations have no position -1 (last token)")
        x = harmful.last_at(layer).to(torch.float64).numpy()
        centroid = harmless.mean_at(layer, -1).to(torch.float64).numpy()
        return self.fit_arrays(x, centroid, layer)

    def fit_arrays(self, x: np.ndarray, centroid: np.ndarray, layer: int) -> DirectionSet:
        """The core: ``x`` [N, d] harmful representations, ``centroid`` [d] harmless mean."""
        x = np.asarray(x, dtype=np.float64)
        centroid = np.asarray(centroid, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 1 or centroid.shape != (x.shape[1],):
            raise ConfigError(f"SOM needs [N, d] data and a [d] centroid, got {x.shape} and {centroid.shape}")
        if not (np.isfinite(x).all() and np.isfinite(centroid).all()):
            raise ConfigError("SOM input contains NaN or inf")
        som, iterations = self._train(x)
        weights = som.get_weights().reshape(-1, x.shape[1])  # C-order over the (x, y) grid
        winners, dists = _winners(x, weights)
        hits = np.bincount(winners, minlength=weights.shape[0])
        order = _hit_order(winners, hits)
        ny = self.grid[1]
        coords = [[int(j // ny), int(j % ny)] for j in order]
        vectors = torch.from_numpy(weights[order] - centroid).to(torch.float32)
        self.som_, self.hits_ = som, hits.reshape(self.grid)
        self.quantization_error_ = float(dists.mean())
        meta: dict[str, Any] = {
            "grid": list(self.grid), "topology": "hexagonal", "neighborhood": "gaussian",
            "sigma": self.sigma, "lr": self.lr, "lr_schedule": self.lr_schedule, "training": self.training,
            "iterations": self.iterations, "iterations_run": iterations, "seed": self.seed,
            "coords": coords, "hits": [int(hits[j]) for j in order], "n_samples": int(x.shape[0]),
            "dropped": [[int(j // ny), int(j % ny)] for j in range(weights.shape[0]) if hits[j] == 0],
            "quantization_error": self.quantization_error_, "layer_convention": LAYER_CONVENTION,
            "direction": "neuron weight - harmless mean (position -1)",
        }
        self.directions_ = DirectionSet(vectors, layer=layer, method="som", position=-1,
                                        ids=list(range(len(order))), meta=meta)
        return self.directions_

    def _train(self, x: np.ndarray):
        from minisom import MiniSom

        decay = {"asymptotic": "asymptotic_decay", "inverse": _inverse_decay,
                 "constant": _constant_decay}[self.lr_schedule]
        som = MiniSom(self.grid[0], self.grid[1], x.shape[1], sigma=self.sigma, learning_rate=self.lr,
                      decay_function=decay, neighborhood_function="gaussian", topology="hexagonal",
                      activation_distance="euclidean", random_seed=self.seed)
        som.random_weights_init(x)
        iterations = self.iterations
        if self.training == "batch":
            som.train_batch_offline(x, iterations)
        else:
            if self.lr_schedule == "inverse":  # equal visits per sample → running mean = sample mean
                iterations = -(-iterations // x.shape[0]) * x.shape[0]
            som.train_random(x, iterations)
        return som, iterations


def _winners(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best-matching neuron per sample (first index on ties, like MiniSom) and its distance."""
    dists = np.stack([np.linalg.norm(x - w, axis=1) for w in weights], axis=1)
    winners = dists.argmin(axis=1)
    return winners, dists[np.arange(len(x)), winners]


def _hit_order(winners: np.ndarray, hits: np.ndarray) -> list[int]:
    """Live neurons by descending hits; ties keep the order of first appearance in the data."""
    first_seen = list(dict.fromkeys(int(w) for w in winners))
    return sorted(first_seen, key=lambda j: -hits[j])  # sorted() is stable


class SOM(Estimator):
    """SOM directions as an estimator: ``SOM(layer=14).fit(acts)``, the layer a hyper-parameter.

    Trains :class:`SomDirections` (same defaults, same checks, run at ``fit``) on ``acts.harmful``
    at ``layer``. After ``fit``: ``directions_`` (one direction per live neuron, most-hit first),
    ``som_`` (the trained MiniSom), ``hits_`` [x, y] and ``quantization_error_``.
    """

    fitted_attributes = ("directions_", "som_", "hits_", "quantization_error_")

    def __init__(self, *, layer: int, grid: tuple[int, int] = (4, 4), sigma: float = 0.33, lr: float = 0.01,
                 iterations: int = 10_000, seed: int = 0, lr_schedule: LrSchedule = "asymptotic",
                 training: Training = "online"):
        self.layer = layer
        self.grid = grid
        self.sigma = sigma
        self.lr = lr
        self.iterations = iterations
        self.seed = seed
        self.lr_schedule = lr_schedule
        self.training = training

    def fit(self, acts: Activations) -> SOM:
        params = self.get_params()
        builder = SomDirections(**{k: v for k, v in params.items() if k != "layer"})
        builder.fit(acts.harmful, acts.harmless, self.layer)
        self.directions_, self.som_, self.hits_ = builder.directions_, builder.som_, builder.hits_
        self.quantization_error_ = builder.quantization_error_
        return self


def som_directions(harmful: ActivationSet, harmless: ActivationSet, layer: int, **kwargs: Any) -> DirectionSet:
    """Functional shortcut: ``SomDirections(**kwargs).fit(harmful, harmless, layer)``."""
    return SomDirections(**kwargs).fit(harmful, harmless, layer)
