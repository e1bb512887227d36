"""One seed for every random number generator a run touches.

Python's ``random``, NumPy's global generator and torch (CPU and CUDA) are seeded here; MiniSom and
Optuna take explicit seeds derived from the same ``--seed`` (``SomDirections(seed=...)``,
``SearchSettings(seed=...)``), so two runs with one seed give the same bits on the same hardware.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from refusal_atlas.core.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch from ``seed`` (called when a workspace opens)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
