"""Geometry of refusal directions and the plots that show it."""

from refusal_atlas.report.geometry import classical_mds, cosine_matrix

__all__ = ["classical_mds", "cosine_matrix"]
