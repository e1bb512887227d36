"""Per-layer strength kernel (heretic-llm 1.4.0's definition, in our layer convention).

For block j and a kernel (peak weight w_max at fractional block position p, floor weight w_min,
falloff distance D > 0): with d = |j − p|, the weight is w_max + (d / D)·(w_min − w_max) for d ≤ D
(a linear tent from the peak down to the floor at distance D) and 0 beyond. Attention and MLP
writes get separate kernels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from refusal_atlas.core.errors import ConfigError


@dataclass(frozen=True)
class StrengthKernel:
    peak: float
    position: float
    floor: float
    distance: float

    def check(self, n_layers: int, what: str = "kernel") -> StrengthKernel:
        values = (self.peak, self.position, self.floor, self.distance)
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"{what} has a non-finite parameter: {asdict(self)}")
        if not 0 <= self.position <= n_layers - 1:
            raise ConfigError(f"{what} peak position {self.position:g} is outside the layers 0..{n_layers - 1}")
        if self.distance <= 0:
            raise ConfigError(f"{what} falloff distance must be > 0, got {self.distance:g}")
        if self.peak < 0 or self.floor < 0:
            raise ConfigError(f"{what} weights must be >= 0, got peak {self.peak:g}, floor {self.floor:g}")
        return self

    def weights(self, n_layers: int) -> list[float]:
        """w_j for blocks 0..n_layers−1."""
        self.check(n_layers)
        out = []
        for j in range(n_layers):
            d = abs(j - self.position)
            out.append(0.0 if d > self.distance else self.peak + (d / self.distance) * (self.floor - self.peak))
        return out

    @classmethod
    def constant(cls, n_layers: int, weight: float = 1.0) -> StrengthKernel:
        """The same weight on every block (weight 1: full ablation of the writes)."""
        return cls(weight, 0.0, weight, float(max(n_layers - 1, 1)))
