"""Difference-in-means (Arditi et al.): r[pos, layer] = mean(harmful) − mean(harmless)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refusal_atlas.model.activations import ActivationSet
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ConfigError


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
