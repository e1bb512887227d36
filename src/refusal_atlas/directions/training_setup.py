"""What every gradient method (``train_rdo``, ``train_cone``, ``train_repind``) trains on.

A plain container, filled from a run directory by :func:`refusal_atlas.workflows.gradient.prepare_training`
or by hand in a notebook (:class:`refusal_atlas.api.RDO`); the estimators never read a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.optim import TrainingData, ValidationSet
from refusal_atlas.directions.targets import Targets


@dataclass
class TrainingSetup:
    """Everything a gradient method needs from a run directory."""

    dim: DirectionSet
    targets: Targets
    data: TrainingData
    val: ValidationSet
    provenance: dict[str, Any]
