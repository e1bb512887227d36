"""Where edit directions come from: a run's DIM candidates, harmless means and saved DirectionSets.

* **Per layer**: block j uses the DIM candidate read at layer j+1 (its output: what block j writes
  into; the last block uses layer L−1), as heretic does in its own indexing.
* **Fractional index** t ∈ [0, L−1] (block-input layers): with i = ⌊t⌋, f = t − i the direction is
  normalize((1−f)·r̂_i + f·r̂_{i+1}) of the unit candidates, one direction for every block.
* **Projected**: each direction is orthogonalized against the (unit) harmless mean of its layer,
  r ← normalize(r − (r·ĝ)ĝ), before any interpolation ("projected abliteration").
* **A DirectionSet** (SOM neurons, RDO, cones…): chosen ids, in the given order, at the set's layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits.projection import orthogonalize_against


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class EditContext:
    """What a search needs to turn parameters into edits: ``dim`` and ``harmless_mean`` are [L, d]."""

    dim: torch.Tensor
    harmless_mean: torch.Tensor
    sets: dict[str, DirectionSet] = field(default_factory=dict)
    position: int = -1

    def __post_init__(self) -> None:
        if self.dim.ndim != 2 or self.harmless_mean.shape != self.dim.shape:
            raise ConfigError(f"DIM candidates {tuple(self.dim.shape)} and harmless means "
                              f"{tuple(self.harmless_mean.shape)} must both be [n_layers, d_model]")
        for name, ds in self.sets.items():
            self.check_set(name, ds)

    @property
    def n_layers(self) -> int:
        return int(self.dim.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.dim.shape[1])

    def check_set(self, name: str, ds: DirectionSet) -> None:
        if ds.d_model != self.d_model or not 0 <= ds.layer < self.n_layers:
            raise ConfigError(f"direction set {name!r} (d_model {ds.d_model}, layer {ds.layer}) does not fit this "
                              f"model (d_model {self.d_model}, layers 0..{self.n_layers - 1}): it comes from "
                              "another model")

    def layer_candidates(self, projected: bool) -> torch.Tensor:
        return orthogonalize_against(self.dim, self.harmless_mean) if projected else _unit(self.dim)

    def per_layer(self, projected: bool) -> torch.Tensor:
        """[L, 1, d]: block j's direction is the candidate at layer min(j+1, L−1)."""
        cands = self.layer_candidates(projected)
        idx = [min(j + 1, self.n_layers - 1) for j in range(self.n_layers)]
        return cands[idx].unsqueeze(1)

    def at_index(self, index: float, projected: bool) -> torch.Tensor:
        """[d]: the direction at a fractional block-input layer (linear interpolation, normalized)."""
        if not math.isfinite(index) or not 0 <= index <= self.n_layers - 1:
            raise ConfigError(f"direction index {index} is outside the layers 0..{self.n_layers - 1}")
        base = self.layer_candidates(projected)  # unit per layer, then interpolated (as heretic does)
        i = min(int(math.floor(index)), self.n_layers - 2) if self.n_layers > 1 else 0
        f = index - i
        v = base[i] if f == 0 else (1 - f) * base[i] + f * base[min(i + 1, self.n_layers - 1)]
        return _unit(v.to(torch.float64)).to(torch.float32)

    def from_set(self, name: str, ids: list[int], projected: bool) -> torch.Tensor:
        """[k, d] unit directions ``ids`` of the set ``name`` (order kept)."""
        if name not in self.sets:
            raise ConfigError(f"no direction set {name!r} in this search (sets: {sorted(self.sets)})")
        ds = self.sets[name]
        vecs = ds.select(list(ids)).unit()
        return orthogonalize_against(vecs, self.harmless_mean[ds.layer]) if projected else vecs

    @classmethod
    def from_run(cls, run_dir: str | Path, set_names: list[str] = ()) -> EditContext:
        """Read dim_candidates, activation means and the named direction sets of a run directory."""
        from refusal_atlas.core.io import load_tensors
        from refusal_atlas.core.rundir import RunDir
        from refusal_atlas.model.activations import load_activation_sets

        run = RunDir(run_dir)
        tensors, meta = load_tensors(run.direction_path("dim_candidates"))
        acts = load_activation_sets(run / "activations.safetensors")
        if "harmless" not in acts:
            raise ArtifactError(f"{run / 'activations.safetensors'} has no harmless representations")
        n_layers = int(run.manifest().get("model", {}).get("n_layers", len(meta["layers"])))
        if meta["layers"] != list(range(n_layers)):
            raise ArtifactError(f"per-layer edits need DIM candidates at every layer 0..{n_layers - 1}; "
                                f"{run.path} has layers {meta['layers']} (re-run `extract` without --layers)")
        dim_path = run.direction_path("dim")
        position = DirectionSet.load(dim_path).position if dim_path.exists() else -1
        if position not in meta["positions"]:
            position = -1
        p = meta["positions"].index(position)
        harmless = acts["harmless"]
        means = torch.stack([harmless.mean_at(l, position) for l in range(n_layers)]).to(torch.float32)
        sets = {name: DirectionSet.load(run.direction_path(name)) for name in set_names}
        return cls(tensors["vectors"][p].to(torch.float32), means, sets, position)
