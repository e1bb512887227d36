"""The edit search space: parameters TPE can learn → a :class:`~refusal_atlas.edits.LayerwiseAblation`.

Every parameter is always sampled (multivariate TPE has no conditional parameters; unused ones are
ignored, as heretic does), and nearby values mean nearby edits:

* ``source``: ``dim:index`` (one DIM direction at a fractional layer ``direction_index``),
  ``dim:per_layer`` (each block its own DIM candidate), or ``set:<name>`` (a subset of a saved
  DirectionSet, e.g. SOM neurons);
* subsets: one inclusion score ``<name>_use_<id>`` ∈ [0, 1] per direction; a direction is in when
  its score is > 0.5 (none above: the highest; more than ``k_max``: the ``k_max`` highest), always
  in the set's canonical order, so flipping one score adds or removes one direction — unlike a
  Lehmer code, where neighbouring values are unrelated subsets; ``mode``: subspace or sequential;
* per component (attn, mlp), a strength kernel: ``<c>_peak`` ∈ [0.1, 1.5], ``<c>_position`` ∈
  [0.3, 1.0]·(L−1), ``<c>_floor_frac`` ∈ [0, 1] (floor = frac × peak), ``<c>_distance`` ∈ [1, L]
  (heretic-llm 1.4.0: peak position from 0.6·L, distance up to 0.6·L);
* ``projected`` (directions orthogonalized against the harmless mean), ``norm_preserving`` and
  ``embed`` (also map the embedding rows with weight 1);
* ``transform`` (only when ``transforms`` offers more than one; off by default, so a search without
  ``--transforms`` samples, dedupes and fingerprints exactly as before): project, householder (reflect
  the writes) or biproject (each block's directions also orthogonalized against the harmless mean of
  the layer it writes into); see :mod:`refusal_atlas.edits.writes`;
* ``router_weight`` ∈ [0, 1] (only with ``router``, for mixture-of-experts models; off by default like
  ``transform``): router suppression of every MoE block (see :mod:`refusal_atlas.edits.layerwise`). The MLP
  kernel of a MoE model needs no parameter of its own: its weight applies to every expert.

Departures from heretic, because on the embedded 0.5B model full DIM ablation (every layer and the
embedding) already beats heretic's strongest front points: the peak may sit from 0.3·(L−1), the
falloff may reach L, and the embedding can be edited, so full ablation is inside the space (and the
run-dir search enqueues it as trial 0). The peak may also be as weak as 0.1 (heretic: 0.8), because
the low-damage half of a front is made of weak edits, and the run-dir search enqueues uniformly
weakened full ablations next (:meth:`EditSpace.full_ablation_params` with ``strength`` < 1), so the front
spans both ends from the first trials on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from optuna.trial import Trial

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits import Edit, LayerwiseAblation, StrengthKernel
from refusal_atlas.edits.writes import check_transform
from refusal_atlas.search.sources import EditContext

COMPONENTS = ("attn", "mlp")
K_LIMIT = 7  # the SOM paper searches k = 1..7


@dataclass(frozen=True)
class EditSpace:
    n_layers: int
    sets: tuple[tuple[str, tuple[int, ...]], ...] = ()
    k_max: int = K_LIMIT
    index_range: tuple[float, float] = (0.4, 0.9)  # × (L−1), for ``dim:index``
    peak_range: tuple[float, float] = (0.1, 1.5)
    position_range: tuple[float, float] = (0.3, 1.0)  # × (L−1)
    distance_range: tuple[float, float] = (1.0, 1.0)  # absolute minimum, maximum × L
    transforms: tuple[str, ...] = ("project",)  # the write transforms searched (one: not a parameter)
    router: bool = False  # also search a router-suppression strength (MoE models)

    def __post_init__(self) -> None:
        if not self.transforms or len(set(self.transforms)) != len(self.transforms):
            raise ConfigError(f"transforms must be distinct and at least one, got {list(self.transforms)}")
        for t in self.transforms:
            check_transform(t)
        if self.n_layers < 2:
            raise ConfigError(f"an edit search needs at least 2 layers, got {self.n_layers}")
        if not 1 <= self.k_max <= K_LIMIT:
            raise ConfigError(f"k_max must be in 1..{K_LIMIT}, got {self.k_max}")
        for name, ids in self.sets:
            if not ids:
                raise ConfigError(f"direction set {name!r} is empty")
            if self.k_max > len(ids):
                raise ConfigError(f"k_max = {self.k_max} but the direction set {name!r} has only {len(ids)} "
                                  f"directions (ids {list(ids)}); lower --k-max")

    @classmethod
    def for_context(cls, ctx: EditContext, k_max: int | None = None,
                    transforms: tuple[str, ...] = ("project",), router: bool = False) -> EditSpace:
        sets = tuple((name, tuple(ds.ids)) for name, ds in sorted(ctx.sets.items()))
        if k_max is None:
            k_max = min([K_LIMIT, *[len(ids) for _, ids in sets]])
        return cls(ctx.n_layers, sets, k_max, transforms=tuple(transforms), router=router)

    def sources(self) -> list[str]:
        return ["dim:index", "dim:per_layer", *[f"set:{name}" for name, _ in self.sets]]

    def _span(self, frac: tuple[float, float]) -> tuple[float, float]:
        top = self.n_layers - 1
        return frac[0] * top, frac[1] * top

    def suggest(self, trial: Trial) -> dict[str, Any]:
        """Sample every parameter of the space; returns the decoded choice."""
        trial.suggest_categorical("source", self.sources())
        trial.suggest_float("direction_index", *self._span(self.index_range))
        for name, ids in self.sets:
            for i in ids:
                trial.suggest_float(f"{name}_use_{i}", 0.0, 1.0)
        if self.sets:
            trial.suggest_categorical("mode", ["subspace", "sequential"])
        trial.suggest_categorical("projected", [False, True])
        trial.suggest_categorical("norm_preserving", [False, True])
        trial.suggest_categorical("embed", [False, True])
        if len(self.transforms) > 1:
            trial.suggest_categorical("transform", list(self.transforms))
        if self.router:
            trial.suggest_float("router_weight", 0.0, 1.0)
        dist_hi = max(self.distance_range[0], self.distance_range[1] * self.n_layers)
        for c in COMPONENTS:
            trial.suggest_float(f"{c}_peak", *self.peak_range)
            trial.suggest_float(f"{c}_position", *self._span(self.position_range))
            trial.suggest_float(f"{c}_floor_frac", 0.0, 1.0)
            trial.suggest_float(f"{c}_distance", self.distance_range[0], dist_hi)
        return self.decode(trial.params)

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Parameters → the edit they mean (unused parameters dropped): JSON, the trial's dedupe key."""
        source = params["source"]
        choice: dict[str, Any] = {"source": source, "projected": bool(params["projected"]),
                                  "norm_preserving": bool(params["norm_preserving"]), "embed": bool(params["embed"])}
        if source == "dim:index":
            choice["direction_index"] = float(params["direction_index"])
        elif source.startswith("set:"):
            name = source[4:]
            ids = dict(self.sets)[name]
            scores = {i: float(params[f"{name}_use_{i}"]) for i in ids}
            chosen = [i for i in ids if scores[i] > 0.5] or [max(ids, key=lambda i: (scores[i], -ids.index(i)))]
            if len(chosen) > self.k_max:
                keep = set(sorted(chosen, key=lambda i: (-scores[i], ids.index(i)))[: self.k_max])
                chosen = [i for i in chosen if i in keep]
            choice.update(set=name, ids=chosen, mode=params["mode"] if len(chosen) > 1 else "subspace")
        elif source != "dim:per_layer":
            raise ConfigError(f"unknown direction source {source!r} (sources: {self.sources()})")
        transform = params["transform"] if len(self.transforms) > 1 else self.transforms[0]
        if transform != "project":  # absent for projection: the choices (dedupe keys) of plain searches stay as they were
            choice["transform"] = check_transform(transform)
        if self.router:
            choice["router"] = float(params["router_weight"])
        for c in COMPONENTS:
            peak = float(params[f"{c}_peak"])
            choice[c] = {"peak": peak, "position": float(params[f"{c}_position"]),
                         "floor": float(params[f"{c}_floor_frac"]) * peak, "distance": float(params[f"{c}_distance"])}
        return choice

    def full_ablation_params(self, layer: int, strength: float = 1.0) -> dict[str, Any]:
        """Parameters meaning ablation of the DIM direction at ``layer`` with weight ``strength`` on every
        write (and, at strength 1 — full ablation — the embedding too): trial 0 is strength 1, so the front
        starts from the selected DIM edit; weaker ones seed its low-damage end."""
        if not self.peak_range[0] <= strength <= self.peak_range[1]:
            raise ConfigError(f"strength {strength:g} is outside the peak range {self.peak_range}")
        lo, hi = self._span(self.index_range)
        p = sum(self._span(self.position_range)) / 2
        dist_hi = max(self.distance_range[0], self.distance_range[1] * self.n_layers)
        distance = max(p, self.n_layers - 1 - p, self.distance_range[0])
        if not lo <= layer <= hi or distance > dist_hi:
            raise ConfigError(f"full ablation at layer {layer} is outside this space")
        params: dict[str, Any] = {"source": "dim:index", "direction_index": float(layer), "projected": False,
                                  "norm_preserving": False, "embed": strength >= 1.0}
        params.update({f"{name}_use_{i}": 0.0 for name, ids in self.sets for i in ids})
        if self.sets:
            params["mode"] = "subspace"
        if len(self.transforms) > 1:
            params["transform"] = "project" if "project" in self.transforms else self.transforms[0]
        if self.router:
            params["router_weight"] = 0.0
        for c in COMPONENTS:
            params.update({f"{c}_peak": strength, f"{c}_position": p, f"{c}_floor_frac": 1.0, f"{c}_distance": distance})
        return params

    def identity(self) -> dict[str, Any]:
        out = {"space": "edits", **json.loads(json.dumps(asdict(self)))}
        if self.transforms == ("project",):  # studies made before transforms existed resume unchanged
            del out["transforms"]
        if not self.router:
            del out["router"]
        return out


def build_edit(choice: dict[str, Any], ctx: EditContext, name: str | None = None) -> LayerwiseAblation:
    """The edit a decoded choice means, on the directions of ``ctx``."""
    n, projected = ctx.n_layers, choice["projected"]
    source = choice["source"]
    if source == "dim:per_layer":
        directions = ctx.per_layer(projected)
    elif source == "dim:index":
        directions = ctx.at_index(choice["direction_index"], projected).expand(n, -1).unsqueeze(1)
    elif source.startswith("set:"):
        directions = ctx.from_set(choice["set"], choice["ids"], projected).unsqueeze(0).expand(n, -1, -1)
    else:
        raise ConfigError(f"unknown direction source {source!r}")
    kernels = {c: StrengthKernel(**choice[c]) for c in COMPONENTS}
    transform = choice.get("transform", "project")
    return LayerwiseAblation.from_kernels(directions.contiguous(), kernels["attn"], kernels["mlp"],
                                          mode=choice.get("mode", "subspace"),
                                          norm_preserving=choice["norm_preserving"],
                                          embed_weight=1.0 if choice.get("embed") else 0.0, transform=transform,
                                          harmless_means=ctx.harmless_mean if transform == "biproject" else None,
                                          router_weight=choice.get("router", 0.0), name=name, meta={"method": "search", "choice": choice})


def run_edit_trials(study, space: EditSpace, ctx: EditContext, objective: Callable[[Edit], tuple[float, float]],
                    seed: int, n_startup_trials: int, n_trials: int, deadline: float | None = None,
                    prune=None, max_kl: float | None = None) -> list:
    """``n_trials`` more trials of the edit space (the seeded loop of :func:`refusal_atlas.search.run_loop`).

    Each trial stores its decoded ``choice``; two trials with the same choice share one evaluation.
    ``prune`` (a :class:`~refusal_atlas.search.trial.PruneRule`, with a StagedObjective) stops
    clearly dominated trials after the first stage (see :func:`refusal_atlas.search.trial.evaluate_staged`),
    and, with a KL cap ``max_kl``, trials whose first-stage KL lies clearly above it.
    """
    from refusal_atlas.search.study import run_loop

    def propose(trial):
        choice = space.suggest(trial)
        trial.set_user_attr("choice", choice)
        if prune is None and not hasattr(objective, "score"):
            return json.dumps(choice, sort_keys=True), lambda: objective(build_edit(choice, ctx))
        from refusal_atlas.search.trial import evaluate_staged

        return json.dumps(choice, sort_keys=True), lambda: evaluate_staged(study, trial, objective,
                                                                           build_edit(choice, ctx), prune, max_kl)

    return run_loop(study, propose, seed=seed, n_startup_trials=n_startup_trials, group=False, n_trials=n_trials,
                    deadline=deadline, desc="edit search trials", max_kl=max_kl)


def context_fingerprint(ctx: EditContext) -> str:
    """Identifies the directions a search builds edits from (DIM candidates, means, sets)."""
    h = hashlib.sha256(repr((ctx.position, sorted(ctx.sets))).encode())
    for t in (ctx.dim, ctx.harmless_mean, *[ctx.sets[k].vectors for k in sorted(ctx.sets)]):
        h.update(t.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def describe_choice(choice: dict[str, Any]) -> str:
    """One short line for the front table."""
    src = choice["source"]
    if src == "dim:index":
        what = f"DIM@{choice['direction_index']:.2f}"
    elif src == "dim:per_layer":
        what = "DIM per layer"
    else:
        what = f"{choice['set']}{choice['ids']}" + (f" {choice['mode'][:3]}" if len(choice["ids"]) > 1 else "")
    flags = "".join([" proj" if choice["projected"] else "", " norm" if choice["norm_preserving"] else "",
                     " +emb" if choice.get("embed") else "",
                     f" {choice['transform']}" if choice.get("transform") else "",
                     f" router {choice['router']:.2f}" if choice.get("router") else ""])
    kern = " ".join(f"{c} {k['peak']:.2f}@{k['position']:.1f}→{k['floor']:.2f}/{k['distance']:.1f}"
                    for c, k in ((c, choice[c]) for c in COMPONENTS))
    return f"{what}{flags}; {kern}"
