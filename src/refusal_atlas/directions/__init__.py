"""Refusal directions: one module per method, each with a scikit-learn-shaped estimator whose
``directions_`` is a :class:`DirectionSet` (and the functions it calls)."""

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import DIM, DimCandidates, difference_in_means
from refusal_atlas.directions.som import SOM, SomDirections, som_directions

__all__ = ["DIM", "DimCandidates", "DirectionSet", "SOM", "difference_in_means", "SomDirections", "som_directions"]
