"""The scikit-learn shape of every direction estimator (DESIGN.md): hyper-parameters in ``__init__``
stored as given, ``fit`` returns ``self``, fitted values end in ``_`` and exist only after ``fit``,
``get_params`` round-trips, and the same seed fits the same directions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from gradient_fixtures import HARMFUL, HARMLESS
from refusal_atlas import api
from refusal_atlas.core.errors import ConfigError, NotFittedError
from refusal_atlas.core.estimator import Estimator
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.cone import RefusalCone
from refusal_atlas.directions.dim import DIM, difference_in_means
from refusal_atlas.directions.optim import TrainConfig
from refusal_atlas.directions.rdo import RDO, train_rdo
from refusal_atlas.directions.repind import RepInd
from refusal_atlas.directions.select import DirectionSelector, select_direction
from refusal_atlas.directions.som import SOM, SomDirections
from refusal_atlas.evaluation.refusal import refusal_token_ids

SMALL = dict(steps=2, batch_size=2, micro_batch=1, eval_every=1, seed=0)


@dataclass
class Ctx:
    atlas: api.Atlas
    acts: api.Activations
    setup: object
    ids: list[int]


@pytest.fixture(scope="module")
def ctx(gradient_parts, gradient_setup) -> Ctx:
    tiny, _, _ = gradient_parts
    atlas = api.Atlas.from_model(tiny.model, tiny.tokenizer, batch_size=4)
    return Ctx(atlas, atlas.extract(HARMFUL, HARMLESS), gradient_setup, refusal_token_ids(tiny.tokenizer))


# (make an unfitted estimator, fit it on the context)
CASES: dict[str, tuple[Callable[[], Estimator], Callable[[Estimator, Ctx], Estimator]]] = {
    "DIM": (lambda: DIM(layer=2), lambda e, c: e.fit(c.acts)),
    "SOM": (lambda: SOM(layer=2, grid=(2, 2), iterations=200, seed=3), lambda e, c: e.fit(c.acts)),
    "DirectionSelector": (lambda: DirectionSelector(layers=[1, 2], batch_size=4),
                          lambda e, c: e.fit(c.atlas.adapter, c.atlas.chat, DIM().fit(c.acts), HARMFUL, HARMLESS,
                                             c.ids)),
    "RDO": (lambda: RDO(cfg=TrainConfig(**SMALL)), lambda e, c: e.fit(c.atlas.adapter, c.setup)),
    "RefusalCone": (lambda: RefusalCone(k=2, n_val_samples=2, cfg=TrainConfig(**SMALL)),
                    lambda e, c: e.fit(c.atlas.adapter, c.setup)),
    "RepInd": (lambda: RepInd(cfg=TrainConfig(**SMALL)), lambda e, c: e.fit(c.atlas.adapter, c.atlas.chat, c.setup)),
    "api.RDO": (lambda: api.RDO(steps=2, eval_every=1, batch_size=2, target_tokens=3),
                lambda e, c: e.fit(c.atlas, c.acts, dim=DIM(layer=2).fit(c.acts))),
    "api.Search": (lambda: api.Search(k=2, trials=2, n_startup_trials=1, seed=0),
                   lambda e, c: e.fit(c.atlas, SOM(layer=2, grid=(2, 2), iterations=200).fit(c.acts),
                                      HARMFUL[:2], HARMLESS[:2])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimator_contract(name, ctx):
    make, fit = CASES[name]
    est = make()
    params = est.get_params()
    # hyper-parameters only, stored as given: __init__ does no work and sets nothing else
    assert set(vars(est)) == set(params) == set(type(est).param_names())
    assert type(est)(**params).get_params() == params
    assert not est.is_fitted and est.fitted_attributes and "directions_" in est.fitted_attributes
    for attr in est.fitted_attributes:
        assert attr.endswith("_") and not attr.endswith("__")
        assert not hasattr(est, attr)  # NotFittedError is an AttributeError
        with pytest.raises(NotFittedError, match=f"{type(est).__name__} is not fitted yet.*{attr}"):
            getattr(est, attr)

    assert fit(est, ctx) is est
    assert est.is_fitted and est.get_params() == params  # fitting does not touch the hyper-parameters
    assert set(vars(est)) - set(params) == set(est.fitted_attributes)
    assert isinstance(est.directions_, DirectionSet)

    again = fit(type(est)(**params), ctx)  # same hyper-parameters and seed: the same directions
    assert torch.equal(again.directions_.vectors, est.directions_.vectors)
    assert (again.directions_.ids, again.directions_.layer) == (est.directions_.ids, est.directions_.layer)


def test_get_params_set_params_and_repr():
    som = SOM(layer=3, seed=1)
    assert som.get_params() == {"layer": 3, "grid": (4, 4), "sigma": 0.33, "lr": 0.01, "iterations": 10_000,
                                "seed": 1, "lr_schedule": "asymptotic", "training": "online"}
    assert som.set_params(seed=5, grid=(2, 2)) is som and som.get_params()["seed"] == 5
    assert repr(DIM(layer=2)) == "DIM(layer=2, position=-1)"
    with pytest.raises(ConfigError, match="no hyper-parameter sigmaa"):
        som.set_params(sigmaa=1.0)
    with pytest.raises(AttributeError) as err:  # a misspelt name is a plain AttributeError, not "not fitted"
        DIM().directoins_
    assert not isinstance(err.value, NotFittedError)
    with pytest.raises(TypeError):
        DIM(2)  # type: ignore[misc]  keyword-only


def test_dim_estimator_matches_the_function_and_picks_the_relatively_largest_layer(ctx):
    cands = difference_in_means(ctx.acts.harmful, ctx.acts.harmless)
    fixed = DIM(layer=1, position=-1).fit(ctx.acts)
    assert torch.equal(fixed.candidates_.vectors, cands.vectors) and fixed.layer_ == 1
    assert torch.equal(fixed.directions_.vectors, cands.at(layer=1, position=-1).vectors)
    auto = DIM().fit(ctx.acts)
    relative = [float(cands.vectors[-1, i].norm() / ctx.acts.harmless.mean_at(l, -1).norm())
                for i, l in enumerate(cands.layers)]
    assert auto.layer_ == cands.layers[relative.index(max(relative))] and auto.layer is None
    with pytest.raises(ConfigError, match="no DIM candidate at layer 9"):
        DIM(layer=9).fit(ctx.acts)


def test_som_estimator_is_som_directions_with_the_layer_a_hyper_parameter(ctx):
    som = SOM(layer=2, grid=(2, 3), iterations=300, seed=4).fit(ctx.acts)
    builder = SomDirections(grid=(2, 3), iterations=300, seed=4)
    ref = builder.fit(ctx.acts.harmful, ctx.acts.harmless, 2)
    assert torch.equal(som.directions_.vectors, ref.vectors) and som.directions_.meta == ref.meta
    assert (som.hits_ == builder.hits_).all() and som.quantization_error_ == builder.quantization_error_
    other = SOM(layer=2, grid=(2, 3), iterations=300, seed=5).fit(ctx.acts)
    assert not torch.equal(other.directions_.vectors, som.directions_.vectors)  # the seed is used
    with pytest.raises(ConfigError, match="grid"):  # SomDirections' checks run at fit, not in __init__
        SOM(layer=2, grid=(0, 2)).fit(ctx.acts)


def test_selector_matches_select_direction(ctx):
    a = ctx.atlas
    cands = difference_in_means(ctx.acts.harmful, ctx.acts.harmless)
    sel = DirectionSelector(layers=[1, 2], batch_size=4, exhaustive=True).fit(a.adapter, a.chat, cands, HARMFUL,
                                                                              HARMLESS, ctx.ids)
    ref = select_direction(a.adapter, a.chat, cands, HARMFUL, HARMLESS, ctx.ids, layers=[1, 2], batch_size=4,
                           exhaustive=True)
    assert sel.scores_ == ref.scores and sel.baseline_ == ref.baseline and sel.relaxed_ == ref.relaxed
    assert sel.best_ is sel.directions_ and torch.equal(sel.best_.vectors, ref.direction.vectors)
    chosen = a.select(DIM().fit(ctx.acts), HARMFUL, HARMLESS, layers=[1, 2])  # the Atlas helper takes a DIM
    assert torch.equal(chosen.vectors, ref.direction.vectors) and "selection" in chosen.meta


def test_rdo_estimator_matches_train_rdo_and_records_training(ctx):
    cfg = TrainConfig(**SMALL)
    rdo = RDO(cfg=cfg).fit(ctx.atlas.adapter, ctx.setup)
    ref = train_rdo(ctx.atlas.adapter, ctx.setup, cfg=cfg)
    assert torch.equal(rdo.directions_.vectors, ref.vectors) and rdo.directions_.method == "rdo"
    assert rdo.loss_curve_ == ref.meta["history"]["loss"] and len(rdo.loss_curve_) == 2
    assert rdo.best_step_ == ref.meta["best_step"] and rdo.validation_history_[0]["step"] == 0
    orth = RDO(orthogonal=True, cfg=cfg).fit(ctx.atlas.adapter, ctx.setup)  # init None: random for RDO⊥
    assert orth.directions_.method == "rdo_orth" and orth.directions_.meta["init"] == "random"
    assert abs(float(orth.directions_.unit()[0] @ ctx.setup.dim.unit()[0])) < 1e-4


def test_cone_and_repind_estimators_keep_every_trained_set(ctx):
    cfg = TrainConfig(**SMALL)
    sweep = RefusalCone(k=3, k_min=2, n_val_samples=2, cfg=cfg).fit(ctx.atlas.adapter, ctx.setup)
    assert [len(c) for c in sweep.cones_] == [2, 3] and sweep.directions_ is sweep.cones_[-1]
    assert sweep.best_step_ == sweep.cones_[-1].meta["best_step"]
    rep = RepInd(n_directions=1, restarts=2, cfg=cfg).fit(ctx.atlas.adapter, ctx.atlas.chat, ctx.setup)
    assert len(rep.directions_) == 1 and [r["restart"] for r in rep.runs_] == [0, 1] and len(rep.best_step_) >= 1


def test_api_wrappers_take_estimators_and_check_at_fit(ctx):
    with pytest.raises(ConfigError, match="trials must be >= 1"):
        api.Search(trials=0).fit(ctx.atlas, DIM(layer=2).fit(ctx.acts), HARMFUL, HARMLESS)
    assert api.DIM is DIM and api.SOM is SOM  # the notebook names are the directions/ estimators
