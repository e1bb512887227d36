"""SOM directions and the subset search on the embedded model (layer 14, our convention)."""

from __future__ import annotations

import pytest
import torch

from refusal_atlas.data import load_prompts
from refusal_atlas.directions.som import SomDirections
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.search.subsets import SubsetSpace, run_trials, subset_identity
from refusal_atlas.search.study import open_study, summarize

LAYER = 14


@pytest.fixture(scope="module")
def embedded_som(embedded_acts):
    return SomDirections(seed=0).fit(embedded_acts["harmful"], embedded_acts["harmless"], LAYER)


def test_som_directions_are_local_refusal_directions(embedded_acts, embedded_som, embedded_dim):
    d = embedded_som
    assert len(d) >= 2 and sum(d.meta["hits"]) == embedded_acts["harmful"].n
    cos = d.unit() @ embedded_dim.unit()[0]
    assert (cos > 0).all(), f"cosines to DIM: {cos.tolist()}"
    # hit-weighted average of the directions ≈ DIM (exact at a k-means fixed point)
    hits = torch.tensor(d.meta["hits"], dtype=torch.float64)
    avg = (hits[:, None] * d.vectors.double()).sum(0) / hits.sum()
    assert torch.nn.functional.cosine_similarity(avg, embedded_dim.vectors[0].double(), dim=0) > 0.99


def test_one_neuron_som_is_dim_on_the_real_model(embedded_acts, embedded_dim):
    d = SomDirections(grid=(1, 1), lr=1.0, lr_schedule="inverse", iterations=48).fit(
        embedded_acts["harmful"], embedded_acts["harmless"], LAYER)
    rel = (d.vectors[0].double() - embedded_dim.vectors[0].double()).norm() / embedded_dim.vectors[0].double().norm()
    assert rel < 1e-6


def test_short_search_lowers_refusal(embedded, embedded_som, tmp_path):
    harmful = [p.instruction for p in load_prompts("harmful_val", n=8, seed=0)]
    harmless = [p.instruction for p in load_prompts("harmless_val", n=8, seed=0)]
    objective = ValidationObjective(embedded.adapter, embedded.chat, harmful, harmless, embedded.refusal_ids,
                                    batch_size=8)
    space, how = SubsetSpace.of(embedded_som, 2), {"seed": 0, "mode": "subspace", "n_startup_trials": 4}
    study = open_study(tmp_path / "study.db", "som", subset_identity(space, embedded_som, objective.fingerprint(), **how))
    run_trials(study, embedded_som, objective, space, n_trials=4, **how)
    summary = summarize(study, 0.1, {"k": 2, **how})
    base = objective.baseline()["refusal"]
    chosen = summary["chosen"]
    assert len(set(chosen["ids"])) == 2
    assert chosen["refusal"] < base - 0.2, (base, summary["pareto"])
    assert all(t["kl"] >= 0 for t in summary["trials"])
