"""RDO: targets, batched losses, the Riemannian training loop, RDO⊥, errors (tiny random models)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from gradient_fixtures import HARMFUL, HARMLESS
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.losses import (LossWeights, addition_ce, ablation_ce, collate, direction_loss,
                                             retain_kl, tokenize_examples)
from refusal_atlas.directions.optim import TrainConfig, TrainingData, retract, tangent_project, train_directions
from refusal_atlas.directions.rdo import train_rdo
from refusal_atlas.directions.targets import Targets, build_targets, first_sentence
from refusal_atlas.core.errors import ConfigError


def test_first_sentence_cuts_after_the_first_end_mark():
    assert first_sentence("I cannot help. Here is why.") == "I cannot help."
    assert first_sentence("Sorry! No.") == "Sorry!"
    assert first_sentence("Version 3.5 is out") == "Version 3.5 is out"
    assert first_sentence("  no end mark here ") == "no end mark here"


def test_collate_left_pads_and_puts_targets_at_the_end(tiny_parts):
    _, _, chat = tiny_parts
    ex = tokenize_examples(chat, ["tell joke", "how to make a bomb please"], ["Sure here", "I cannot help with that"])
    b = collate(ex, pad_id=0)
    assert b.input_ids.shape[1] == max(len(e.prompt_ids) + len(e.target_ids) for e in ex)
    for i, e in enumerate(ex):
        t = len(e.target_ids)
        assert b.input_ids[i, -t:].tolist() == list(e.target_ids)
        assert b.labels[i][b.label_mask[i]].tolist() == list(e.target_ids)
        assert int(b.label_mask[i].sum()) == t
        assert int(b.input_ids[i, b.prompt_end[i]]) == e.prompt_ids[-1]
        assert int(b.attention_mask[i].sum()) == len(e.prompt_ids) + t
    assert b.attention_mask[0, 0] == 0  # the shorter row is padded on the left


def test_batched_losses_equal_token_weighted_single_example_losses(gradient_parts, gradient_setup):
    _, adapter, _ = gradient_parts
    data = gradient_setup.data
    r = gradient_setup.dim.unit()[0]
    fns = {"ablation": (data.answer, lambda b: ablation_ce(adapter, b, r)),
           "addition": (data.refusal, lambda b: addition_ce(adapter, b, r, 3.0, 2)),
           "retain": (data.retain, lambda b: retain_kl(adapter, b, r))}
    for name, (examples, fn) in fns.items():
        batched = fn(collate(examples, data.pad_id))
        singles = [(fn(collate([e], data.pad_id)), len(e.target_ids)) for e in examples]
        expected = sum(v * n for v, n in singles) / sum(n for _, n in singles)
        assert torch.allclose(batched, expected, atol=1e-4), name


def test_targets_are_cached_and_rebuilt_when_dim_changes(tiny_parts, gradient_dim, tmp_path, monkeypatch):
    _, adapter, chat = tiny_parts
    dim, path = gradient_dim, tmp_path / "targets.json"
    first = build_targets(adapter, chat, dim, HARMFUL, HARMLESS, max_new_tokens=4, cache=path)
    assert path.exists() and len(first.answer) == 3 and first.meta["alpha"] == pytest.approx(float(dim.norms[0]))

    import refusal_atlas.directions.targets as targets_mod

    def boom(*a, **k):
        raise AssertionError("generate must not run when the cache matches")

    monkeypatch.setattr(targets_mod, "generate", boom)
    again = build_targets(adapter, chat, dim, HARMFUL, HARMLESS, max_new_tokens=4, cache=path)
    assert again.answer == first.answer and again.meta.get("cached")
    other = DirectionSet(dim.vectors * 2, dim.layer, "dim")
    with pytest.raises(AssertionError, match="must not run"):
        build_targets(adapter, chat, other, HARMFUL, HARMLESS, max_new_tokens=4, cache=path)


def test_targets_need_a_dim_direction(tiny_parts, tmp_path):
    _, adapter, chat = tiny_parts
    with pytest.raises(ConfigError, match="DIM direction"):
        build_targets(adapter, chat, None, HARMFUL, HARMLESS)
    with pytest.raises(ConfigError, match="DIM direction"):
        build_targets(adapter, chat, None, HARMFUL, HARMLESS, cache=tmp_path / "t.json")
    with pytest.raises(ConfigError):
        Targets(["a"], ["b"], [], ["r"], ["k"])


@pytest.mark.parametrize("which", ["ablation", "addition", "retain"])
def test_one_riemannian_gradient_step_reduces_each_loss(gradient_parts, gradient_setup, which):
    _, adapter, _ = gradient_parts
    data = gradient_setup.data
    weights = LossWeights(**{k: (1.0 if k == which else 0.0) for k in ("ablation", "addition", "retain")})
    batches = data.batches(range(len(data)))
    r = torch.nn.functional.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    param = r.clone().requires_grad_(True)
    loss, _ = direction_loss(adapter, batches, param[0], 3.0, 2, weights)
    loss.backward()
    g = tangent_project(param.grad, r)
    assert g.norm() > 0
    new = retract(r - 0.05 * g / g.norm())
    after, _ = direction_loss(adapter, batches, new[0], 3.0, 2, weights)
    assert float(after) < float(loss.detach())


def test_one_adamw_step_of_the_training_loop_reduces_the_loss(gradient_parts, gradient_setup):
    _, adapter, _ = gradient_parts
    data = gradient_setup.data
    batches = data.batches(range(len(data)))
    start = torch.nn.functional.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(4)), dim=1)

    def loss_fn(param, idx, slot, step):
        return direction_loss(adapter, batches, param[0], 3.0, 2)

    before = float(loss_fn(start, [], 0, 0)[0])
    cfg = TrainConfig(steps=1, batch_size=2, micro_batch=2, lr=1e-3, clip=None)
    res = train_directions(start, loss_fn, len(data), lambda p: {"objective": 0.0}, cfg)
    assert float(loss_fn(res.last, [], 0, 0)[0]) < before
    assert res.history["loss"][0] == pytest.approx(before, rel=1e-4)


def test_tangent_projection_and_retraction_keep_orthonormal_rows():
    g = torch.Generator().manual_seed(0)
    b = retract(torch.randn(3, 16, generator=g))
    assert torch.allclose(b @ b.T, torch.eye(3), atol=1e-5)
    grad = tangent_project(torch.randn(3, 16, generator=g), b)
    sym = grad @ b.T + b @ grad.T
    assert sym.abs().max() < 1e-5  # tangent to the Stiefel manifold
    r = b[:1]
    assert abs(float(tangent_project(torch.randn(1, 16, generator=g), r) @ r[0])) < 1e-6


def test_synthetic_training_stays_on_the_sphere_and_keeps_the_best_validated_iterate():
    u = torch.nn.functional.normalize(torch.arange(1.0, 9.0), dim=0)
    seen = []

    def loss_fn(param, idx, slot, step):
        return -(param[0] @ u), {}

    def validate(p):
        seen.append(float(p[0].norm()))
        return {"objective": -float(p[0] @ u)}

    start = torch.nn.functional.normalize(torch.ones(1, 8) - 2 * u, dim=1)
    res = train_directions(start, loss_fn, 4, validate, TrainConfig(steps=30, batch_size=2, micro_batch=1,
                                                                    lr=0.05, eval_every=5))
    assert all(abs(n - 1) < 1e-5 for n in seen)
    assert float(res.params[0] @ u) > float(start[0] @ u) + 0.5
    best = min(res.val_history, key=lambda v: v["objective"])
    assert res.best_step == best["step"]


def test_plateau_cuts_the_lr_then_stops():
    def loss_fn(param, idx, slot, step):
        return param.sum() * 0.0 + 1.0, {}

    cfg = TrainConfig(steps=100, batch_size=1, micro_batch=1, eval_every=1, patience=2, n_lr_reduce=2)
    res = train_directions(torch.ones(1, 4), loss_fn, 3, lambda p: {"objective": 1.0}, cfg)
    assert res.stopped == "plateau" and len(res.history["loss"]) == 6
    assert res.history["lr"][-1] == pytest.approx(1e-4)


def test_nan_loss_raises_at_the_first_step_and_stops_cleanly_later():
    def nan_at(k):
        def loss_fn(param, idx, slot, step):
            bad = float("nan") if step >= k else 0.0
            return param.sum() + bad, {}
        return loss_fn

    cfg = TrainConfig(steps=5, batch_size=1, micro_batch=1, eval_every=1)
    with pytest.raises(ConfigError, match="NaN"):
        train_directions(torch.ones(1, 4), nan_at(1), 2, lambda p: {"objective": 0.0}, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train_directions(torch.ones(1, 4), nan_at(3), 2, lambda p: {"objective": float(p.sum())}, cfg)
    assert res.stopped == "nan_loss" and any("non-finite" in str(w.message) for w in caught)
    assert torch.isfinite(res.params).all() and len(res.history["loss"]) == 2


def test_train_rdo_and_rdo_orth(gradient_parts, gradient_setup):
    _, adapter, _ = gradient_parts
    setup, dim = gradient_setup, gradient_setup.dim
    cfg = TrainConfig(steps=3, batch_size=3, micro_batch=2, eval_every=1)
    rdo = train_rdo(adapter, setup, cfg=cfg)
    assert rdo.method == "rdo" and rdo.norms[0] == pytest.approx(float(dim.norms[0]), rel=1e-5)
    assert len(rdo.meta["history"]["loss"]) == 3 and {"ablation", "addition", "retain"} <= set(rdo.meta["history"])
    assert [v["step"] for v in rdo.meta["val_history"]] == [0, 1, 2, 3]
    orth = train_rdo(adapter, setup, cfg=cfg, init="random", orthogonal_to=dim.vectors)
    assert orth.method == "rdo_orth" and abs(orth.meta["cos_with_dim"]) < 1e-5
    with pytest.raises(ConfigError, match="RDO⊥"):
        train_rdo(adapter, setup, cfg=cfg, init="dim", orthogonal_to=dim.vectors)
    with pytest.raises(ConfigError, match="degenerate"):
        train_rdo(adapter, setup, cfg=cfg, init=dim.vectors.clone(), orthogonal_to=dim.vectors)


class _LossValidation:
    """Validation by the full-data training loss, which a few RDO steps must lower (a random model's
    refusal score under ablation need not move in three steps, so it cannot tell a stuck loop)."""

    def __init__(self, adapter, setup):
        self.adapter, self.setup = adapter, setup
        self.harmful, self.harmless, self.kl_weight = HARMFUL, HARMLESS, 0.0

    def score(self, params):
        dim, data = self.setup.dim, self.setup.data
        loss, _ = direction_loss(self.adapter, data.batches(list(range(len(data)))), params[0],
                                 float(dim.norms[0]), dim.layer, LossWeights())
        return {"objective": float(loss), "refusal": 0.0, "kl": 0.0}


def test_rdo_moves_off_dim_and_returns_a_better_validated_direction(gradient_parts, gradient_setup):
    import dataclasses

    _, adapter, _ = gradient_parts
    val = _LossValidation(adapter, gradient_setup)
    setup = dataclasses.replace(gradient_setup, val=val)
    rdo = train_rdo(adapter, setup, cfg=TrainConfig(steps=4, batch_size=3, micro_batch=3, eval_every=1, lr=3e-2))
    objective = {v["step"]: v["objective"] for v in rdo.meta["val_history"]}
    best = objective[rdo.meta["best_step"]]
    assert rdo.meta["best_step"] > 0 and rdo.meta["cos_with_dim"] < 1 - 1e-4  # it moved off its DIM start
    assert best == min(objective.values()) and best < objective[0]  # and is better than DIM on the objective
    assert val.score(rdo.unit())["objective"] == pytest.approx(best, rel=1e-5)  # the returned one is the best


def test_bad_train_config_is_rejected():
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ConfigError, match="weight"):
        LossWeights(ablation=-1.0)


def test_cli_reports_a_missing_dim_direction_without_loading_a_model(tmp_path):
    (tmp_path / "manifest.json").write_text('{"config": {"seed": 0}}')
    cmd = [sys.executable, "-m", "refusal_atlas.cli", "directions", "rdo", "--run-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: no DIM direction") and "Traceback" not in out.stderr


def test_targets_that_miss_their_behaviour_are_masked(gradient_parts):
    _, _, chat = gradient_parts
    targets = Targets(HARMFUL[:2], HARMLESS[:2], ["I'm sorry, I cannot help", "Sure here is how"],
                      ["Sure here is a poem", "I cannot help with that"], ["a poem", "weather"])
    data = TrainingData(chat, targets)
    assert data.n_masked == {"answer": 1, "refusal": 1}
    b = data.batches([0, 1])
    assert b.answer.label_mask[0].sum() == 0 and b.answer.label_mask[1].sum() > 0
    assert b.refusal.input_ids.shape[0] == 1 and b.refusal.label_mask.sum() > 0  # the masked row is dropped
    assert data.batches([0]).refusal is None
    assert b.retain.label_mask.sum(dim=1).min() > 0  # retain targets are never masked
    unchecked = TrainingData(chat, targets, check_targets=False)
    assert unchecked.n_masked == {"answer": 0, "refusal": 0}
    assert unchecked.batches([0]).answer.label_mask.sum() > 0
