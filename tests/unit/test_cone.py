"""Refusal cones: uniform positive-orthant sampling, cone membership, training, errors."""

from __future__ import annotations

import math

import pytest
import torch

from gradient_fixtures import HARMFUL
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.cone import (_initial_basis, check_cone_dim, evaluate_cone, sample_cone,
                                           sample_orthant, sweep_cones, train_cone)
from refusal_atlas.directions.optim import TrainConfig, retract
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.refusal import refusal_token_ids


def ks_uniform(x: torch.Tensor, lo: float, hi: float) -> float:
    """Kolmogorov–Smirnov distance between the sample and Uniform(lo, hi)."""
    u = ((x.double() - lo) / (hi - lo)).sort().values
    n = len(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


N = 4000
KS_CRIT = 1.95 / math.sqrt(N)  # 0.1% level


def test_2d_orthant_samples_have_uniform_angle():
    s = sample_orthant(N, 2, torch.Generator().manual_seed(0))
    assert (s >= 0).all() and torch.allclose(s.norm(dim=1), torch.ones(N, dtype=s.dtype))
    angle = torch.atan2(s[:, 1], s[:, 0])  # exact law: Uniform(0, π/2)
    assert ks_uniform(angle, 0.0, math.pi / 2) < KS_CRIT
    # angle to the nearest basis vector: exact law Uniform(0, π/4) (not piled up near the basis)
    nearest = torch.minimum(angle, math.pi / 2 - angle)
    assert ks_uniform(nearest, 0.0, math.pi / 4) < KS_CRIT


def test_3d_orthant_coordinates_are_uniform_and_symmetric():
    # Archimedes: on S^2 each coordinate is Uniform(-1, 1), so on the positive orthant Uniform(0, 1)
    s = sample_orthant(N, 3, torch.Generator().manual_seed(1))
    for j in range(3):
        assert ks_uniform(s[:, j], 0.0, 1.0) < KS_CRIT


def test_the_uniformity_check_rejects_a_biased_sampler():
    # uniform on the simplex, then normalized, is NOT uniform on the sphere (piles up mid-cone)
    u = torch.rand(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = torch.stack([u, 1 - u], dim=1)
    s = z / z.norm(dim=1, keepdim=True)
    assert ks_uniform(torch.atan2(s[:, 1], s[:, 0]), 0.0, math.pi / 2) > KS_CRIT


def test_cone_samples_are_unit_nonnegative_combinations_of_the_basis():
    basis = retract(torch.randn(3, 20, generator=torch.Generator().manual_seed(3)))
    r = sample_cone(basis, 500, torch.Generator().manual_seed(4))
    coeffs = r @ basis.T
    assert (coeffs >= -1e-6).all()
    assert torch.allclose(coeffs @ basis, r, atol=1e-5)  # inside the span
    assert torch.allclose(r.norm(dim=1), torch.ones(500), atol=1e-5)


def test_bad_cone_dimensions_are_rejected():
    with pytest.raises(ConfigError, match=">= 1"):
        check_cone_dim(0, 32)
    with pytest.raises(ConfigError, match="exceeds"):
        check_cone_dim(33, 32)
    with pytest.raises(ConfigError):
        sample_orthant(5, 0)


def test_warm_start_keeps_the_previous_basis_first():
    dim = DirectionSet(torch.randn(16), layer=1, method="dim")
    prev = retract(torch.randn(2, 16, generator=torch.Generator().manual_seed(5)))
    b = _initial_basis(3, dim, prev, "dim", seed=0)
    assert torch.allclose(b[:2], prev, atol=1e-5)
    assert torch.allclose(b @ b.T, torch.eye(3), atol=1e-5)
    with pytest.raises(ConfigError, match="warm start"):
        _initial_basis(2, dim, prev, "dim", seed=0)


def test_cone_sweep_trains_orthonormal_bases_of_each_dimension(gradient_parts, gradient_setup):
    tiny, adapter, chat = gradient_parts
    dim = gradient_setup.dim
    cfg = TrainConfig(steps=2, batch_size=2, micro_batch=1, eval_every=2)
    seen: list = []  # each cone is handed over as soon as it is trained (saved before the next starts)
    cones = sweep_cones(adapter, gradient_setup, 3, k_min=2, cfg=cfg, n_val_samples=2, on_cone=seen.append)
    assert [len(c) for c in cones] == [2, 3] and seen == cones
    for c in cones:
        u = c.unit()
        assert c.method == "cone" and torch.allclose(u @ u.T, torch.eye(len(c)), atol=1e-5)
        assert torch.allclose(c.norms, torch.full((len(c),), float(dim.norms[0])), rtol=1e-5)
        assert len(c.meta["history"]["loss"]) == 2
        assert len(c.meta["val_history"][0]["per_direction"]) == 2 + len(c)  # fixed samples + basis
    with pytest.raises(ConfigError, match="exceeds"):
        train_cone(adapter, gradient_setup, 33, cfg=cfg)
    report = evaluate_cone(adapter, chat, cones[-1], HARMFUL, refusal_token_ids(tiny.tokenizer), n_samples=5)
    assert len(report["sample_scores"]) == 5 and report["min"] <= report["median"] <= report["max"]
    assert len(report["basis_scores"]) == 3


def test_a_sampled_direction_sends_gradient_to_every_basis_vector(gradient_parts, gradient_setup):
    _, adapter, _ = gradient_parts
    data = gradient_setup.data
    from refusal_atlas.directions.losses import direction_loss

    basis = retract(torch.randn(3, 32, generator=torch.Generator().manual_seed(6))).requires_grad_(True)
    s = sample_orthant(1, 3, torch.Generator().manual_seed(7)).float()
    loss, _ = direction_loss(adapter, data.batches([0, 1]), (s @ basis)[0], 3.0, 2)
    loss.backward()
    assert (basis.grad.norm(dim=1) > 0).all()
