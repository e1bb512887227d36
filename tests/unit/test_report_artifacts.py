"""Readers behind the report's geometry plots: shapes they accept, what they reject, layouts they compute."""

import math

import pytest
import torch

from refusal_atlas.report import artifacts
from refusal_atlas.report.geometry import direction_rows
from refusal_atlas.report.plots_geometry import som_centers
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ArtifactError


def test_som_centers_match_minisom_hexagonal_layout():
    minisom = pytest.importorskip("minisom")
    som = minisom.MiniSom(4, 3, 2, topology="hexagonal")
    for i in range(4):
        for j in range(3):
            x, y = som.convert_map_to_euclidean((i, j))
            assert som_centers((i, j), (4, 3), "hexagonal") == pytest.approx((float(x), float(y)))
    assert som_centers((2, 1), (4, 3), "rectangular") == (2.0, 1.0)


def test_direction_rows_keeps_big_sets_to_their_first_row():
    sets = {"dim": torch.randn(1, 8), "cone": torch.randn(3, 8), "som": torch.randn(50, 8)}
    labels, groups, rows = direction_rows(sets, {"cone": [4, 5, 6]}, max_rows=40)
    assert labels == ["dim", "cone[4]", "cone[5]", "cone[6]", "som[0]"]
    assert groups == ["dim", "cone", "cone", "cone", "som"] and rows.shape == (5, 8)
    labels, _, _ = direction_rows(sets, max_rows=60)
    assert len(labels) == 54


def test_training_runs_reads_rdo_and_repind_layouts_and_ignores_untrained_sets():
    run = {"best_step": 4, "stopped": "plateau", "history": {"loss": [1.0, 0.5], "lr": [0.1, 0.1]},
           "val_history": [{"step": 0, "objective": 1.0}, {"step": 4, "objective": 0.2}]}
    (rdo,) = artifacts.training_runs(run)
    assert rdo.best_step == 4 and rdo.stopped == "plateau" and rdo.best_objective() == 0.2
    repind = artifacts.training_runs({"runs": [{"direction": 0, "restart": j, **run} for j in range(3)]})
    assert [r.label for r in repind] == [f"direction 0 restart {j}" for j in range(3)]
    assert artifacts.training_runs({"norm": 3.0}) == [] and artifacts.training_runs({"grid": [2, 2]}) == []
    for bad in ({"history": "oops"}, {"history": {"loss": ["x"]}}, {"val_history": [{"objective": 1}]},
                {"runs": "oops"}):
        with pytest.raises(ArtifactError):
            artifacts.training_runs(bad)


def test_som_grid_places_a_subset_on_its_parent_map():
    meta = {"grid": [2, 2], "topology": "hexagonal", "coords": [[1, 1], [0, 0], [1, 0]], "hits": [3, 2, 1],
            "cos_to_dim": [0.9, 0.5, 0.1]}
    full = DirectionSet(torch.randn(3, 4), 0, "som", meta=meta)
    grid = artifacts.som_grid(full.select([2, 0]), None)
    cells = {c.coord: c for c in grid.cells}
    assert grid.subset and len(cells) == 4
    assert cells[(1, 1)].id == 0 and cells[(1, 1)].in_set and cells[(1, 1)].cos == pytest.approx(0.9)
    assert cells[(0, 0)].id == 1 and not cells[(0, 0)].in_set and cells[(0, 0)].hits == 2
    assert cells[(0, 1)].id is None and cells[(0, 1)].hits == 0  # no neuron there: dropped
    dim = DirectionSet(full.vectors[1:2].clone(), 0, "dim")
    own = artifacts.som_grid(full, dim)
    assert not own.subset and {c.coord: c for c in own.cells}[(0, 0)].cos == pytest.approx(1.0)
    assert artifacts.som_grid(DirectionSet(torch.randn(1, 4), 0, "dim"), None) is None
    with pytest.raises(ArtifactError):
        artifacts.som_grid(DirectionSet(torch.randn(3, 4), 0, "som", meta={**meta, "coords": [[5, 5]] * 3}), None)


def test_metric_readers_default_layers_and_reject_ragged_records():
    curve = artifacts.cross_ablation({"intervention": "ablate:repind", "dim_under_ablation": [0.1, 0.2],
                                      "direction_under_dim_ablation": [0.0, -0.1], "mean_abs_cos_change": 0.1})
    assert curve.name == "repind" and curve.layers == [0, 1] and curve.cos_with_dim is None
    with pytest.raises(ArtifactError):
        artifacts.cross_ablation({"dim_under_ablation": [0.1], "direction_under_dim_ablation": []})
    dist = artifacts.cone_distribution({"k": 2, "sample_scores": [1, 2], "baseline_score": float("nan")})
    assert dist.k == 2 and dist.basis == [] and dist.baseline is None and not math.isnan(dist.samples[0])
    with pytest.raises(ArtifactError, match="missing"):
        artifacts.cone_distribution({"k": 2, "basis_scores": [1.0]})
