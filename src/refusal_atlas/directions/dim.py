"""Difference-in-means (Arditi et al.): r[pos, layer] = mean(harmful) − mean(harmless)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refusal_atlas.model.activations import Activations, ActivationSet
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.estimator import Estimator


@dataclass
class DimCandidates:
    """All DIM candidates: ``vectors`` [n_positions, n_layers, d] (float32, raw)."""

    vectors: torch.Tensor
    layers: list[int]
    positions: list[int]

    def at(self, *, layer: int, position: int = -1) -> DirectionSet:
        """The candidate read at block-input ``layer`` and post-instruction ``position`` (keywords: the
        two are easy to swap, and selection records key them the other way round, (position, layer))."""
        if layer not in self.layers or position not in self.positions:
            raise ConfigError(f"no DIM candidate at layer {layer}, position {position} "
                              f"(layers {self.layers[0]}..{self.layers[-1]}, positions {self.positions})")
        v = self.vectors[self.positions.index(position), self.layers.index(layer)]
        return DirectionSet(v.clone(), layer=layer, method="dim", position=position,
                            meta={"norm": float(v.norm())})


def difference_in_means(harmful: ActivationSet, harmless: ActivationSet) -> DimCandidates:
    """Difference of the two sets' means at every shared (position, layer)."""
    if harmful.layers != harmless.layers or harmful.positions != harmless.positions:
        raise ConfigError("harmful and harmless representations were taken at different layers/positions")
    diff = (harmful.mean - harmless.mean).to(torch.float32)
    if not torch.isfinite(diff).all():
        raise ConfigError("difference-in-means has NaN/inf entries")
    return DimCandidates(diff, list(harmful.layers), list(harmful.positions))


class DIM(Estimator):
    """Difference in means as an estimator: ``DIM(layer=14, position=-1).fit(acts)``.

    After ``fit``: ``candidates_`` (every (layer, position) candidate, :class:`DimCandidates`),
    ``layer_`` (the layer used) and ``directions_`` (the candidate at ``layer_``, ``position``).
    ``layer=None`` takes the layer where the difference is largest relative to the harmless residual
    norm: a quick default, not a validated choice (that is :class:`~refusal_atlas.directions.select.DirectionSelector`).
    """

    fitted_attributes = ("candidates_", "layer_", "directions_")

    def __init__(self, *, layer: int | None = None, position: int = -1):
        self.layer = layer
        self.position = position

    def fit(self, acts: Activations) -> DIM:
        self.candidates_ = difference_in_means(acts.harmful, acts.harmless)
        self.layer_ = self.layer if self.layer is not None else largest_relative_layer(
            self.candidates_, acts.harmless, self.position)
        self.directions_ = self.candidates_.at(layer=self.layer_, position=self.position)
        return self


def largest_relative_layer(candidates: DimCandidates, harmless: ActivationSet, position: int = -1) -> int:
    """The layer whose candidate at ``position`` (the last one if absent) is longest relative to the
    harmless mean there: the norm of the residual stream grows with depth, so raw norms favour late layers."""
    p = candidates.positions.index(position) if position in candidates.positions else -1
    scale = harmless.mean[p].double().norm(dim=-1).clamp_min(1e-12)
    return candidates.layers[int((candidates.vectors[p].double().norm(dim=-1) / scale).argmax())]
