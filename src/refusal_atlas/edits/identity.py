"""How run records name an edit made from a direction set: by the set, not by the edit.

``evaluate --interventions ablate`` with the direction file ``rdo_b`` records rows labelled
``ablate:rdo_b`` (the method, ``ablate:dim``, when the set was not loaded from a file; ``[k=2,subspace]``
added for several directions; ``actadd:dim@16x1`` for activation addition) carrying the set's method,
file name, content fingerprint, layer and ids, and its completions are keyed by those plus the vectors.
So two direction files never share a metrics row, a replaced file never reuses old completions, and
run directories written before stay readable. A saved edit (``edits/NAME``) is named by its own file
instead: ``edit:NAME@<fingerprint>`` (:attr:`refusal_atlas.edits.base.Edit.label`).
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import vectors_fingerprint
from refusal_atlas.edits.projection import as_matrix


class SetIdentity:
    """The direction set (a DirectionSet or a bare [k, d] / [d] tensor) an edit was made from.

    ``matrix`` is the set's vectors as given (dtype and device kept: the hooks use them exactly as
    evaluation always has); ``layer`` defaults to the set's; ``label`` replaces the default label.
    """

    def __init__(self, directions, layer: int | None = None, label: str | None = None):
        self.directions = directions
        self.matrix = as_matrix(directions)
        self.layer = layer if layer is not None else getattr(directions, "layer", None)
        self.label = label
        self.fingerprint = self._fingerprint()

    @property
    def source(self) -> str:
        """The direction file's name (stem) when the set was loaded from one, else its method."""
        return getattr(self.directions, "name", None) or getattr(self.directions, "method", "custom")

    @property
    def k(self) -> int:
        return int(self.matrix.shape[0])

    def _fingerprint(self) -> str:
        if hasattr(self.directions, "fingerprint"):
            return self.directions.fingerprint()
        if not torch.isfinite(self.matrix).all():  # hashed as the DirectionSet(vectors, layer or -1, "custom") it is
            raise ConfigError("direction vectors contain NaN or inf")
        return vectors_fingerprint(self.matrix, list(range(self.k)), -1 if self.layer is None else self.layer)

    def describe(self, label: str, kind: str) -> dict[str, Any]:
        """The fields a metrics row carries (``intervention``, ``kind``, ``method``, ``directions``,
        ``fingerprint``, ``layer``, and ``direction_ids``/``k`` for a DirectionSet), in that order."""
        out = {"intervention": label, "kind": kind, "method": getattr(self.directions, "method", "custom"),
               "directions": getattr(self.directions, "name", None), "fingerprint": self.fingerprint,
               "layer": self.layer}
        ids = getattr(self.directions, "ids", None)
        if ids is not None:
            out["direction_ids"] = list(ids)
            out["k"] = len(ids)
        return out
