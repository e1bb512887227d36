"""Refusal directions: one module per method, all producing :class:`DirectionSet`."""

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import DimCandidates, difference_in_means
from refusal_atlas.directions.som import SomDirections, som_directions

__all__ = ["DimCandidates", "DirectionSet", "difference_in_means", "SomDirections", "som_directions"]
