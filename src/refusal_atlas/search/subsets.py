"""The SOM paper's subset search: which k of a DirectionSet's directions to ablate together.

A subset of k distinct ids is a Lehmer code: parameter ``pick_i`` ranges over ``[0, n−1−i]`` and indexes
into the ids not yet chosen, so every point of the space is a valid, duplicate-free subset (no rejection
or resampling). With ``k_min < k_max`` a parameter ``k`` is searched as well and ``pick_i`` exists only
for ``i < k``. The loop, storage and pick rule are :mod:`refusal_atlas.search.study`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits.projection import AblationMode
from refusal_atlas.search.study import run_loop, subset_key

Objective = Callable[[DirectionSet], tuple[float, float]]


# --- search space --------------------------------------------------------------------------------
def decode_lehmer(codes: Sequence[int], ids: Sequence[int]) -> list[int]:
    """Lehmer code → distinct ids: code i picks among the ids not chosen by codes 0..i-1."""
    pool, chosen = list(ids), []
    for i, c in enumerate(codes):
        if not 0 <= c < len(pool):
            raise ConfigError(f"Lehmer digit {i} = {c} is out of range [0, {len(pool) - 1}]")
        chosen.append(pool.pop(c))
    return chosen


def encode_lehmer(chosen: Sequence[int], ids: Sequence[int]) -> list[int]:
    """Inverse of :func:`decode_lehmer` (e.g. to enqueue a known subset)."""
    pool, codes = list(ids), []
    for i in chosen:
        if i not in pool:
            raise ConfigError(f"id {i} is not available (ids {list(ids)}, or it repeats)")
        codes.append(pool.index(i))
        pool.remove(i)
    return codes


@dataclass(frozen=True)
class SubsetSpace:
    """Subsets of ``k_min..k_max`` distinct ids out of ``ids``."""

    ids: tuple[int, ...]
    k_min: int
    k_max: int

    def __post_init__(self) -> None:
        if self.k_min < 1:
            raise ConfigError(f"k must be >= 1, got {self.k_min}")
        if self.k_max < self.k_min:
            raise ConfigError(f"k_max ({self.k_max}) must be >= k ({self.k_min})")
        if self.k_max > len(self.ids):
            raise ConfigError(f"k = {self.k_max} but only {len(self.ids)} directions are available (ids "
                              f"{list(self.ids)}); lower --k/--k-max or use a larger SOM")

    def suggest(self, trial: Trial) -> list[int]:
        k = self.k_min if self.k_min == self.k_max else trial.suggest_int("k", self.k_min, self.k_max)
        n = len(self.ids)
        return decode_lehmer([trial.suggest_int(f"pick_{i}", 0, n - 1 - i) for i in range(k)], self.ids)

    @classmethod
    def of(cls, directions: DirectionSet, k: int, k_max: int | None = None) -> SubsetSpace:
        """Subsets of ``k`` (up to ``k_max``) of a DirectionSet's directions."""
        return cls(tuple(directions.ids), k, k if k_max is None else k_max)


# --- the search loop ---------------------------------------------------------------------------------
def subset_identity(space: SubsetSpace, directions: DirectionSet, objective_fingerprint: str, *, seed: int,
                    mode: AblationMode, n_startup_trials: int) -> dict[str, Any]:
    """What a subset study is bound to (see :func:`refusal_atlas.search.study.open_study`)."""
    return {"ids": list(space.ids), "k_min": space.k_min, "k_max": space.k_max, "seed": seed, "mode": mode,
            "n_startup_trials": n_startup_trials, "directions": directions.fingerprint(),
            "objective": objective_fingerprint}


def subset_settings(k: int, k_max: int | None, *, seed: int, mode: AblationMode, kl_threshold: float,
                    n_startup_trials: int) -> dict[str, Any]:
    """What search.json records as a subset search's settings (:func:`refusal_atlas.search.study.summarize`)."""
    return {"k": k, "k_max": k_max, "seed": seed, "mode": mode, "kl_threshold": kl_threshold,
            "n_startup_trials": n_startup_trials}


def run_trials(study: optuna.Study, directions: DirectionSet, objective: Objective, space: SubsetSpace, *,
               seed: int, mode: AblationMode = "subspace", n_startup_trials: int = 10, n_trials: int,
               deadline: float | None = None) -> list[FrozenTrial]:
    """Run ``n_trials`` more subset trials (see :func:`run_loop`); returns the trials this call finished.

    ``mode``: how a subset is ablated (subspace | sequential), which decides when two subsets are the same edit.
    """
    def propose(trial: Trial):
        ids = space.suggest(trial)
        trial.set_user_attr("ids", ids)
        trial.set_user_attr("k", len(ids))
        return repr(subset_key(ids, mode)), lambda: objective(directions.select(ids))

    return run_loop(study, propose, seed=seed, n_startup_trials=n_startup_trials, group=space.k_min < space.k_max,
                    n_trials=n_trials, deadline=deadline)
