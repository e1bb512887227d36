"""RepInd: the independence loss, residual capture under ablation, gradient averaging, training."""

from __future__ import annotations

import pytest
import torch

from gradient_fixtures import HARMFUL
from refusal_atlas.directions.losses import LossWeights, direction_loss
from refusal_atlas.directions.optim import TrainConfig, retract, tangent_project, train_directions
from refusal_atlas.directions.repind import (_Reference, capture_prompt_end, cross_ablation_change,
                                             independence_layers, independence_loss, last_token_reps,
                                             train_repind)
from refusal_atlas.core.errors import ConfigError


def test_independence_layers_use_the_0_9_cutoff():
    assert independence_layers(24) == list(range(21))
    assert independence_layers(26) == list(range(23))
    with pytest.raises(ConfigError):
        independence_layers(1, 0.5)


def test_independence_loss_is_zero_without_change_and_positive_with_it():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(5, 3, 8, generator=g)
    r, v = torch.randn(8, generator=g), torch.randn(8, generator=g)
    assert float(independence_loss(clean, clean, clean, r, v)) == 0.0
    moved = clean + 0.5 * torch.randn(5, 3, 8, generator=g)
    assert float(independence_loss(clean, moved, clean, r, v)) > 0
    assert float(independence_loss(clean, clean, moved, r, v)) > 0


def test_independence_gradient_includes_the_clean_cosine_term():
    g = torch.Generator().manual_seed(1)
    clean, minus_r, minus_v = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.randn(6, generator=g, dtype=torch.float64)
    r = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    # the exact gradient of the stated objective (nothing detached) passes a finite-difference check
    assert torch.autograd.gradcheck(lambda x: independence_loss(clean, minus_r, minus_v, x, v), (r,))


def test_captured_residuals_are_the_ablated_prompt_end_states(gradient_parts, gradient_setup):
    _, adapter, chat = gradient_parts
    targets, data = gradient_setup.targets, gradient_setup.data
    layers = independence_layers(adapter.n_layers)
    r = retract(torch.randn(1, 32, generator=torch.Generator().manual_seed(2)))[0]
    batches, store = data.batches([0, 1, 2]), {}
    with torch.no_grad():
        direction_loss(adapter, batches, r, 3.0, 2, LossWeights(1.0, 0.0, 0.0),
                       inner=lambda: capture_prompt_end(adapter, layers, batches.answer.prompt_end, store))
    captured = torch.stack([store[l] for l in layers], dim=1)
    # the ablation ran first: nothing of r is left in what we captured
    assert (captured @ r).abs().max() < 1e-4
    # same states as a prompt-only pass with r ablated (padding and target tokens do not leak in)
    reference = last_token_reps(adapter, chat, targets.harmful, layers, r)
    assert torch.allclose(captured, reference, atol=1e-4)


def test_a_gradient_step_reduces_the_independence_loss(gradient_parts, gradient_setup):
    _, adapter, chat = gradient_parts
    dim, targets, data = gradient_setup.dim, gradient_setup.targets, gradient_setup.data
    layers = independence_layers(adapter.n_layers)
    v = dim.unit()[0]
    ref = _Reference(adapter, chat, targets.harmful, layers, [v], batch_size=4)
    batches = data.batches([0, 1, 2])

    def ind_loss(r: torch.Tensor) -> torch.Tensor:
        store: dict = {}
        direction_loss(adapter, batches, r, 3.0, 2, LossWeights(0.0, 0.0, 0.0),
                       inner=lambda: capture_prompt_end(adapter, layers, batches.answer.prompt_end, store))
        return ref.loss([0, 1, 2], torch.stack([store[l] for l in layers], dim=1), r, [v])

    # start close to v, where ablating one visibly moves the other
    r0 = retract((v + 0.3 * torch.randn(32, generator=torch.Generator().manual_seed(3))).unsqueeze(0))
    param = r0.clone().requires_grad_(True)
    loss = ind_loss(param[0])
    loss.backward()
    step = tangent_project(param.grad, r0)
    after = ind_loss(retract(r0 - 0.02 * step / step.norm())[0])
    assert float(loss.detach()) > 0 and float(after.detach()) < float(loss.detach())


def test_micro_batches_average_per_example_gradients():
    # the seed summed snapshots of the running gradient; we want the plain mean over examples
    targets = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))

    def loss_fn(param, idx, slot, step):
        return -(targets[idx] @ param[0]).mean(), {}

    start = retract(torch.ones(1, 5))
    results = []
    for micro in (1, 2, 6):
        cfg = TrainConfig(steps=1, batch_size=6, micro_batch=micro, clip=None, seed=0)
        results.append(train_directions(start, loss_fn, 6, lambda p: {"objective": 0.0}, cfg).last)
    assert torch.allclose(results[0], results[1], atol=1e-6) and torch.allclose(results[0], results[2], atol=1e-6)


@pytest.mark.parametrize("losing", [0, 1])
def test_train_repind_finds_several_directions_with_restarts(gradient_parts, gradient_setup, monkeypatch, losing):
    """Each kept direction is its best restart on validation: restart ``losing`` is made to score worse."""
    import refusal_atlas.directions.repind as repind

    _, adapter, chat = gradient_parts
    dim = gradient_setup.dim
    cfg = TrainConfig(steps=2, batch_size=3, micro_batch=3, eval_every=1)
    results = []

    def train_and_handicap(*args, **kwargs):
        result = train_directions(*args, **kwargs)
        if len(results) % 2 == losing:
            result.val_history = [{**v, "objective": v["objective"] + 1e6} for v in result.val_history]
        results.append(result)
        return result

    monkeypatch.setattr(repind, "train_directions", train_and_handicap)
    rep = train_repind(adapter, chat, gradient_setup, n_directions=2, restarts=2, cfg=cfg)
    assert rep.method == "repind" and len(rep) == 2
    assert torch.allclose(rep.norms, torch.full((2,), float(dim.norms[0])), rtol=1e-5)
    runs = rep.meta["runs"]
    assert [(r["direction"], r["restart"]) for r in runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all("independence" in v for r in runs for v in r["val_history"])
    assert all("independence" in r["history"] for r in runs)
    for n in range(2):  # the kept direction is the restart that was not handicapped, not merely one of them
        winner, loser = results[2 * n + 1 - losing].params[0], results[2 * n + losing].params[0]
        assert not torch.allclose(winner, loser, atol=1e-3)
        assert torch.allclose(rep.unit()[n], winner, atol=1e-6)
        assert runs[2 * n + losing]["val_objective"] > 1e5 > runs[2 * n + 1 - losing]["val_objective"]
    with pytest.raises(ConfigError):
        train_repind(adapter, chat, gradient_setup, n_directions=0, cfg=cfg)
    report = cross_ablation_change(adapter, chat, rep.unit()[0], dim.unit()[0], HARMFUL)
    assert len(report["v_under_r_ablation"]) == len(independence_layers(adapter.n_layers))
    same = cross_ablation_change(adapter, chat, dim.unit()[0], dim.unit()[0], HARMFUL)
    assert same["loss"] > 0
