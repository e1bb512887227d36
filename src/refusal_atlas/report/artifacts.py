"""Readers that turn run-directory artifacts into plain plot data.

The producers evolve independently of the report (RDO and cones write ``meta["history"]``, RepInd
``meta["runs"]``, scripts/measure_gradient.py appends records to metrics.json), so every reader
checks the shape it needs and raises :class:`ArtifactError` saying what is wrong; the report then
skips that one plot instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ArtifactError

DISTRIBUTION_METRIC = "mean_refusal_score_distribution"
CROSS_ABLATION_METRIC = "cross_ablation_with_dim"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numbers(value: Any, what: str) -> list[float]:
    if value is None:
        raise ArtifactError(f"{what} is missing")
    if not isinstance(value, list) or not all(_is_number(x) for x in value):
        raise ArtifactError(f"{what} must be a list of numbers, got {type(value).__name__}")
    return [float(x) for x in value]


def _optional_number(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


# ------------------------------------------------------------------------------------ training
@dataclass
class TrainingRun:
    """One optimisation run: per-step training terms and the periodic validation scores."""

    label: str
    history: dict[str, list[float]] = field(default_factory=dict)
    val_history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    stopped: str | None = None

    def best_objective(self) -> float | None:
        """Validation objective at the best step (what the run kept)."""
        return next((_optional_number(v.get("objective")) for v in self.val_history
                     if v.get("step") == self.best_step), None)


def _training_run(meta: Mapping[str, Any], label: str, where: str) -> TrainingRun:
    hist = meta.get("history", {})
    if not isinstance(hist, dict):
        raise ArtifactError(f"{where}: history must be a dict of per-step lists, got {type(hist).__name__}")
    history = {str(k): _numbers(v, f"{where}: history[{k!r}]") for k, v in hist.items()}
    vals = meta.get("val_history", [])
    if not isinstance(vals, list) or not all(isinstance(v, dict) and _is_number(v.get("step")) for v in vals):
        raise ArtifactError(f"{where}: val_history must be a list of dicts with a numeric step")
    best = meta.get("best_step")
    stopped = meta.get("stopped")
    return TrainingRun(label, history, list(vals), int(best) if _is_number(best) else None,
                       stopped if isinstance(stopped, str) else None)


def training_runs(meta: Mapping[str, Any]) -> list[TrainingRun]:
    """RDO/cone: the run in meta["history"]/["val_history"]; RepInd: one per restart in meta["runs"].

    Returns [] for directions that were not trained by gradient descent (DIM, SOM).
    """
    if "runs" in meta:
        runs = meta["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise ArtifactError(f"runs must be a list of dicts, got {type(runs).__name__}")
        out = [_training_run(r, f"direction {r.get('direction', i)} restart {r.get('restart', 0)}", f"runs[{i}]")
               for i, r in enumerate(runs)]
    elif "history" in meta or "val_history" in meta:
        out = [_training_run(meta, "training", "meta")]
    else:
        return []
    return [r for r in out if any(r.history.values()) or r.val_history]


def _joined(value: Any) -> str | None:
    if isinstance(value, list):
        return ", ".join(str(v) for v in dict.fromkeys(value)) or None
    return None if value is None else str(value)


def gradient_row(name: str, d: DirectionSet, runs: list[TrainingRun], dim: DirectionSet | None) -> dict[str, Any]:
    """One line of the gradient-directions table: what was trained, where it stopped, how DIM-like it is."""
    objectives = [o for o in (r.best_objective() for r in runs) if o is not None]
    cos = cos_with_dim(d, dim)
    return {"name": name, "method": d.method, "k": len(d), "layer": d.layer,
            "steps": ", ".join(str(len(r.history.get("loss", []))) for r in runs),
            # older RepInd files keep these only per run
            "best_step": _joined(d.meta.get("best_step", [r.best_step for r in runs])),
            "stopped": _joined(d.meta.get("stopped", [r.stopped for r in runs])),
            "best val objective": min(objectives) if objectives else None,
            "cos with DIM": None if cos is None else ", ".join(f"{c:+.3f}" for c in cos[:6])
            + (" …" if len(cos) > 6 else "")}


def cos_with_dim(d: DirectionSet, dim: DirectionSet | None) -> list[float] | None:
    """Cosine of every row with the DIM direction (None without a comparable DIM)."""
    if dim is None or dim.d_model != d.d_model:
        return None
    return (d.unit().double() @ dim.unit()[0].double()).tolist()


# ------------------------------------------------------------------------------------- metrics
@dataclass
class ConeDistribution:
    """Mean refusal scores under ablation of cone samples, the cone's basis and random directions."""

    k: int | None
    label: str
    samples: list[float]
    basis: list[float]
    random: list[float]
    baseline: float | None


def cone_distribution(record: Mapping[str, Any]) -> ConeDistribution:
    """Read a ``mean_refusal_score_distribution`` record (sample_scores is required)."""
    samples = _numbers(record.get("sample_scores"), "sample_scores")
    if not samples:
        raise ArtifactError("sample_scores is empty")
    k = record.get("k")
    return ConeDistribution(int(k) if _is_number(k) else None, str(record.get("intervention", "cone")), samples,
                            _numbers(record.get("basis_scores", []), "basis_scores"),
                            _numbers(record.get("random_scores", []), "random_scores"),
                            _optional_number(record.get("baseline_score")))


@dataclass
class CrossAblation:
    """Per-layer mean cosine change between a direction and DIM when either is ablated."""

    name: str
    layers: list[int]
    dim_under_ablation: list[float]
    direction_under_dim_ablation: list[float]
    mean_abs_change: float | None
    cos_with_dim: float | None


def cross_ablation(record: Mapping[str, Any]) -> CrossAblation:
    """Read a ``cross_ablation_with_dim`` record; layers default to 0..n-1 (independence_layers)."""
    a = _numbers(record.get("dim_under_ablation"), "dim_under_ablation")
    b = _numbers(record.get("direction_under_dim_ablation"), "direction_under_dim_ablation")
    if not a or len(a) != len(b):
        raise ArtifactError(f"per-layer lists must be non-empty and equally long, got {len(a)} and {len(b)}")
    layers = record.get("layers")
    if not (isinstance(layers, list) and len(layers) == len(a) and all(isinstance(x, int) for x in layers)):
        layers = list(range(len(a)))
    name = str(record.get("intervention", "?")).removeprefix("ablate:")
    return CrossAblation(name, layers, a, b, _optional_number(record.get("mean_abs_cos_change")),
                         _optional_number(record.get("cos_with_dim")))


# ----------------------------------------------------------------------------------------- SOM
@dataclass
class SomCell:
    """One neuron of the map: its grid coordinate, direction id (None when dropped), hits, cos with DIM."""

    coord: tuple[int, int]
    id: int | None
    hits: int
    cos: float | None
    in_set: bool


@dataclass
class SomGrid:
    shape: tuple[int, int]
    topology: str
    cells: list[SomCell]
    subset: bool
    quantization_error: float | None


def som_grid(d: DirectionSet, dim: DirectionSet | None) -> SomGrid | None:
    """Neurons of a SOM DirectionSet (or of a subset chosen from one) laid out on their grid.

    Direction id r is SOM neuron rank r, at ``meta["coords"][r]`` with ``meta["hits"][r]`` (select()
    keeps ids and meta, so a search's subset still finds its neurons). Grid positions that won no
    sample are dropped cells. None when the set carries no grid.
    """
    meta = d.meta
    if "coords" not in meta or "grid" not in meta:
        return None
    grid = meta["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        raise ArtifactError(f"SOM grid must be two positive ints, got {grid!r}")
    nx, ny = grid
    coords, hits = meta["coords"], meta.get("hits")
    if not (isinstance(coords, list) and all(isinstance(c, list) and len(c) == 2 and all(isinstance(v, int) for v in c)
                                             and 0 <= c[0] < nx and 0 <= c[1] < ny for c in coords)):
        raise ArtifactError("SOM coords must be [x, y] pairs inside the grid")
    if not (isinstance(hits, list) and len(hits) == len(coords) and all(isinstance(h, int) for h in hits)):
        raise ArtifactError("SOM hits must be one int per coordinate")
    bad = [i for i in d.ids if not 0 <= i < len(coords)]
    if bad:
        raise ArtifactError(f"direction ids {bad} have no SOM coordinates ({len(coords)} neurons)")
    cos_all = meta.get("cos_to_dim")
    cos_meta = [_optional_number(c) for c in cos_all] if isinstance(cos_all, list) and len(cos_all) == len(coords) \
        else [None] * len(coords)
    own = cos_with_dim(d, dim)
    cos_by_id = {i: (own[r] if own is not None else cos_meta[i]) for r, i in enumerate(d.ids)}
    cells = [SomCell((c[0], c[1]), i, hits[i], cos_by_id.get(i, cos_meta[i]), i in cos_by_id)
             for i, c in enumerate(coords)]
    live = {cell.coord for cell in cells}
    cells += [SomCell((x, y), None, 0, None, False) for x in range(nx) for y in range(ny) if (x, y) not in live]
    topology = meta.get("topology", "rectangular")
    return SomGrid((nx, ny), topology if topology in ("hexagonal", "rectangular") else "rectangular", cells,
                   len(d) < len(coords), _optional_number(meta.get("quantization_error")))

