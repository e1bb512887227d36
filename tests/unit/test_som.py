"""SOM directions: the paper's "SOMs generalize difference-in-means" claims, determinism, metadata,
errors, the CLI verb, and the two multi-direction ablation modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from refusal_atlas.model.activations import ActivationSet, extract, save_activation_sets
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import difference_in_means
from refusal_atlas.directions.som import SomDirections, _hit_order, parse_grid
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.edits.ablation import ablate


def _acts(x64: np.ndarray, layer: int = 5) -> ActivationSet:
    """An ActivationSet as extract() makes it: float64 mean, float32 per-prompt vectors at pos -1."""
    mean = torch.from_numpy(x64.mean(0)).reshape(1, 1, -1)
    return ActivationSet(layers=[layer], positions=[-1], mean=mean, n=len(x64),
                         last=torch.from_numpy(x64).to(torch.float32).unsqueeze(1))


def _clustered(seed: int = 0, sizes=(60, 35, 25), d: int = 24, spread: float = 8.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d)) * spread
    harmful = np.concatenate([c + rng.normal(size=(n, d)) for c, n in zip(centers, sizes)])
    harmless = rng.normal(size=(50, d)) + 3.0
    return harmful, harmless


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- SOM generalizes DIM ---------------------------------------------------------------------------
def test_one_neuron_with_inverse_t_rate_is_exactly_dim():
    harmful, harmless = _clustered()
    h, l = _acts(harmful), _acts(harmless)
    dim = difference_in_means(h, l).at(layer=5, position=-1)
    som = SomDirections(grid=(1, 1), lr=1.0, lr_schedule="inverse", iterations=1000, seed=3)
    d = som.fit(h, l, layer=5)
    assert len(d) == 1 and d.meta["hits"] == [len(harmful)]
    # 1000 is rounded up to a multiple of N = 120 so each sample is visited equally often
    assert d.meta["iterations_run"] == 1080
    assert _rel(d.vectors[0], dim.vectors[0]) < 1e-6
    # the neuron itself is the float64 sample mean of what it saw, to rounding
    w = torch.from_numpy(som.som_.get_weights().reshape(-1))
    assert _rel(w, h.last_at(5).double().mean(0)) < 1e-12
    # MiniSom's own asymptotic schedule only approximates the mean (why the option exists)
    approx = SomDirections(grid=(1, 1), seed=3).fit(h, l, layer=5)
    assert _rel(approx.vectors[0], dim.vectors[0]) > 1e-3


def test_one_neuron_matches_dim_on_real_extraction(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    harmful = extract(adapter, chat, prompts[:4], positions=None, batch_size=2)
    harmless = extract(adapter, chat, prompts[3:], positions=None, batch_size=2)
    dim = difference_in_means(harmful, harmless).at(layer=2, position=-1)
    d = SomDirections(grid=(1, 1), lr=1.0, lr_schedule="inverse", iterations=40).fit(harmful, harmless, 2)
    assert _rel(d.vectors[0], dim.vectors[0]) < 1e-6


def test_kmeans_limit_hit_weighted_mean_of_directions_is_dim():
    harmful, harmless = _clustered(seed=1)
    h, l = _acts(harmful), _acts(harmless)
    dim = difference_in_means(h, l).at(layer=5, position=-1).vectors[0]
    som = SomDirections(grid=(3, 3), sigma=1e-3, lr=1.0, lr_schedule="constant", training="batch",
                        iterations=40, seed=1)
    d = som.fit(h, l, layer=5)
    assert len(d) >= 3  # a genuine multi-neuron map, not the trivial case
    # converged: every live neuron is the mean of the samples it wins (a k-means fixed point)
    x = h.last_at(5).double()
    centroid = l.mean_at(5, -1)
    weights = d.vectors.double() + centroid
    winners = torch.cdist(x, weights).argmin(dim=1)
    for j in range(len(d)):
        assert int((winners == j).sum()) == d.meta["hits"][j]
        assert _rel(weights[j], x[winners == j].mean(0)) < 1e-6
    hits = torch.tensor(d.meta["hits"], dtype=torch.float64)
    weighted = (hits[:, None] * d.vectors.double()).sum(0) / hits.sum()
    assert _rel(weighted, dim) < 1e-6


def test_paper_default_map_approximates_dim_and_orders_by_hits():
    harmful, harmless = _clustered(seed=2)
    h, l = _acts(harmful), _acts(harmless)
    dim = difference_in_means(h, l).at(layer=5, position=-1).vectors[0]
    d = SomDirections().fit(h, l, layer=5)  # 4x4, sigma 0.33, lr 0.01, 10k iterations
    hits = d.meta["hits"]
    assert sum(hits) == len(harmful) and all(x > 0 for x in hits)
    assert hits == sorted(hits, reverse=True)
    assert d.ids == list(range(len(d)))
    assert len(d.meta["coords"]) + len(d.meta["dropped"]) == 16
    assert len({tuple(c) for c in d.meta["coords"] + d.meta["dropped"]}) == 16
    weighted = (torch.tensor(hits, dtype=torch.float64)[:, None] * d.vectors.double()).sum(0) / sum(hits)
    assert _rel(weighted, dim) < 0.05  # an online SOM only approximates the fixed point


def test_ties_keep_first_appearance_order():
    winners = np.array([3, 1, 3, 1, 0, 2, 2])
    hits = np.bincount(winners, minlength=5)
    assert _hit_order(winners, hits) == [3, 1, 2, 0]  # neuron 4 has no hits: dropped


def test_same_seed_same_directions_and_metadata_roundtrip(tmp_path):
    harmful, harmless = _clustered(seed=4)
    h, l = _acts(harmful), _acts(harmless)
    a = SomDirections(grid=(2, 3), iterations=2000, seed=7).fit(h, l, 5)
    b = SomDirections(grid=(2, 3), iterations=2000, seed=7).fit(h, l, 5)
    c = SomDirections(grid=(2, 3), iterations=2000, seed=8).fit(h, l, 5)
    assert torch.equal(a.vectors, b.vectors) and a.meta == b.meta
    assert not (a.vectors.shape == c.vectors.shape and torch.equal(a.vectors, c.vectors))
    a.save(tmp_path / "som.safetensors")
    back = DirectionSet.load(tmp_path / "som.safetensors")
    assert back.method == "som" and back.layer == 5 and back.meta == json.loads(json.dumps(a.meta))
    assert torch.equal(back.vectors, a.vectors)


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid=(0, 4)), "at least 1x1"), (dict(grid=(4, 0)), "at least 1x1"), (dict(sigma=0.0), "sigma"),
    (dict(lr=-1.0), "learning rate"), (dict(iterations=0), "iterations"), (dict(lr_schedule="cosine"), "lr_schedule"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SomDirections(**kwargs)


def test_unknown_layer_and_missing_per_prompt_vectors():
    harmful, harmless = _clustered()
    h, l = _acts(harmful), _acts(harmless)
    with pytest.raises(ConfigError, match="layer 9 is not in the harmful"):
        SomDirections().fit(h, l, layer=9)
    h.last = None
    with pytest.raises(ArtifactError, match="per-prompt"):
        SomDirections().fit(h, l, layer=5)


def test_parse_grid():
    assert parse_grid("4x4") == (4, 4) and parse_grid("2X3") == (2, 3)
    for bad in ("4", "4x", "axb", "2x2x2"):
        with pytest.raises(ConfigError, match="4x4"):
            parse_grid(bad)


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_directions_som_uses_dim_layer(tmp_path):
    from refusal_atlas.cli import app

    harmful, harmless = _clustered()
    save_activation_sets(tmp_path / "activations.safetensors", {"harmful": _acts(harmful), "harmless": _acts(harmless)})
    runner = CliRunner()
    res = runner.invoke(app, ["directions", "som", "-r", str(tmp_path), "--grid", "2x2"])
    assert isinstance(res.exception, ConfigError) and "no --layer given" in str(res.exception)
    DirectionSet(torch.ones(24), layer=5, method="dim").save(tmp_path / "directions" / "dim.safetensors")
    res = runner.invoke(app, ["directions", "som", "-r", str(tmp_path), "--grid", "2x2", "--iterations", "500"])
    assert res.exit_code == 0, res.output
    d = DirectionSet.load(tmp_path / "directions" / "som.safetensors")
    assert d.layer == 5 and d.meta["grid"] == [2, 2] and len(d.meta["cos_to_dim"]) == len(d)
    res = runner.invoke(app, ["directions", "som", "-r", str(tmp_path), "--grid", "0x4"])
    assert isinstance(res.exception, ConfigError)
    res = runner.invoke(app, ["directions", "som", "-r", str(tmp_path), "--layer", "3"])
    assert isinstance(res.exception, ConfigError) and "layer 3" in str(res.exception)


# --- multi-direction ablation modes -------------------------------------------------------------------
def _logits_under(adapter, tiny, batch, directions, mode):
    with ablate(adapter, directions, mode=mode):
        return tiny.model(**batch).logits


def test_ablation_modes_differ_for_correlated_directions(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    batch = chat.encode(prompts)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(adapter.d_model, generator=g)
    b = 0.8 * a + 0.6 * torch.randn(adapter.d_model, generator=g) * a.norm() / adapter.d_model ** 0.5
    dirs = torch.stack([a, b])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.7
    sub = _logits_under(adapter, tiny, batch, dirs, "subspace")
    seq = _logits_under(adapter, tiny, batch, dirs, "sequential")
    seq_rev = _logits_under(adapter, tiny, batch, dirs.flip(0), "sequential")
    assert (sub - seq).abs().max() > 1e-3  # sequential rank-1 projections leave a component along a
    assert (seq - seq_rev).abs().max() > 1e-3  # and depend on the order
    assert torch.allclose(sub, _logits_under(adapter, tiny, batch, dirs.flip(0), "subspace"), atol=1e-5)


def test_ablation_modes_agree_for_orthogonal_directions(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    batch = chat.encode(prompts)
    q, _ = torch.linalg.qr(torch.randn(adapter.d_model, 3, generator=torch.Generator().manual_seed(1)))
    dirs = q.T * torch.tensor([[2.0], [0.5], [7.0]])  # orthogonal, unequal norms
    sub = _logits_under(adapter, tiny, batch, dirs, "subspace")
    seq = _logits_under(adapter, tiny, batch, dirs, "sequential")
    base = tiny.model(**batch).logits
    assert (sub - base).abs().max() > 1e-3  # the ablation does something
    assert torch.allclose(sub, seq, atol=1e-4)
