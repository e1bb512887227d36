"""DirectionSet: k direction vectors with the metadata needed to use and reproduce them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.core.io import load_tensors, save_tensors, vectors_fingerprint


@dataclass
class DirectionSet:
    """``vectors`` [k, d] (raw, unnormalized: their norms carry the ActAdd strength).

    ``layer`` is the block input the directions were read at (our convention), ``position`` the
    post-instruction offset (None for methods that pool positions), ``method`` e.g. "dim", "som",
    ``ids`` stable identifiers (SOM neuron rank, cone sample index), ``meta`` anything else (grid
    coordinates, hit counts, losses per step, provenance).
    """

    vectors: torch.Tensor
    layer: int
    method: str
    position: int | None = -1
    ids: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    name: str | None = field(default=None, compare=False)  # the file it was loaded from (stem), not saved

    def __post_init__(self) -> None:
        if self.vectors.ndim == 1:
            self.vectors = self.vectors.unsqueeze(0)
        if self.vectors.ndim != 2 or self.vectors.shape[0] == 0:
            raise ConfigError(f"a DirectionSet needs a [k, d] tensor with k >= 1, got {tuple(self.vectors.shape)}")
        if not torch.isfinite(self.vectors).all():
            raise ConfigError("direction vectors contain NaN or inf")
        if not self.ids:
            self.ids = list(range(self.vectors.shape[0]))
        if len(self.ids) != self.vectors.shape[0]:
            raise ConfigError("ids must match the number of vectors")

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, key: int | slice) -> DirectionSet:
        """Rows by position (``dirs[:3]``: the first three, e.g. the most-hit SOM neurons) as a DirectionSet."""
        rows = list(range(len(self)))[key] if isinstance(key, slice) else [list(range(len(self)))[key]]
        return self.select([self.ids[r] for r in rows])

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    @property
    def norms(self) -> torch.Tensor:
        return self.vectors.norm(dim=1)

    def unit(self) -> torch.Tensor:
        return self.vectors / self.norms.clamp_min(1e-12).unsqueeze(1)

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over the float32 vector bytes, ids and layer: which artifact made a result."""
        return vectors_fingerprint(self.vectors, self.ids, self.layer)

    def select(self, ids: list[int]) -> DirectionSet:
        """The sub-set with the given ids, in the given order (order matters for sequential ablation)."""
        missing = [i for i in ids if i not in self.ids]
        if missing:
            raise ConfigError(f"direction ids {missing} not in this set (ids: {self.ids})")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"direction ids must be distinct, got {ids}")
        rows = [self.ids.index(i) for i in ids]
        return DirectionSet(self.vectors[rows].clone(), self.layer, self.method, self.position, list(ids),
                            {**self.meta, "selected_from": self.ids})

    def save(self, path: str | os.PathLike) -> Path:
        meta = {"layer": self.layer, "method": self.method, "position": self.position, "ids": self.ids,
                "meta": self.meta}
        return save_tensors(path, {"vectors": self.vectors.to(torch.float32)}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DirectionSet:
        tensors, meta = load_tensors(path)
        if "vectors" not in tensors or "layer" not in meta:
            raise ArtifactError(f"{path} is not a DirectionSet file")
        return cls(tensors["vectors"], meta["layer"], meta["method"], meta.get("position"), meta.get("ids", []),
                   meta.get("meta", {}), name=Path(path).name.removesuffix(".safetensors"))
