"""Arditi-style choice of one DIM candidate (position, layer).

For each candidate r: (1) refusal score on harmful val prompts with r ablated everywhere (lower is
better), (2) KL of the next-token distribution on harmless val prompts under that ablation, and
(3) the steering score: refusal score on harmless val prompts with +r added at its layer. A
candidate is dropped if KL > ``kl_threshold``, steering < ``induce_threshold`` (it cannot induce
refusal), or it sits in the last ``prune_layer_frac`` of layers. The winner is the survivor with
the lowest ablation refusal score.

If no candidate passes, the filters are relaxed in a fixed order (first the induce filter, then
KL), as the Geometry-of-refusal code does when every candidate fails a check; the relaxation is
recorded in the result. ``strict=True`` raises instead.

Cost cut: (1) is computed for every candidate; (2) and (3) only in increasing order of (1) until
the first survivor, which gives the same winner as computing everything. ``exhaustive=True``
computes all three for every candidate (for plots).

Exact speed-ups (``fast=True``; ``fast=False`` is the plain way, and both give the same scores to
float rounding, tested): the chat template's shared prefix runs once per candidate instead of once
per prompt (prefix_cache), and the steering pass (ActAdd at layer l) starts at block l from the
clean pass's block inputs, captured once, since nothing below l changes.

Crash safety: with ``checkpoint=`` every scored candidate is written there atomically as soon as it
is done; a rerun with the same candidates, prompts and batch size reads it back instead of
recomputing, so a killed selection resumes and ends with the same result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import DIM, DimCandidates
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.estimator import Estimator
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.directions.select_checkpoint import SelectionCheckpoint
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.edits import ActAdd, DirectionalAblation
from refusal_atlas.model.prefix_cache import PrefixPlan, plan_logprobs, supports_prefix_reuse
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.core.progress import progress


@dataclass
class Selection:
    direction: DirectionSet | None  # None only when strict and nothing passed
    scores: list[dict]  # one record per candidate: position, layer, refusal, kl, steering, status
    baseline: dict
    relaxed: list[str] = field(default_factory=list)  # filters dropped because every candidate failed them


RELAXATION_ORDER = ("induce", "kl")


def _filter_reason(rec: dict, kl_threshold: float, induce_threshold: float, ignore: tuple[str, ...] = ()) -> str | None:
    if any(isinstance(rec.get(k), float) and math.isnan(rec[k]) for k in ("refusal", "kl", "steering")):
        return "nan"
    if rec["kl"] > kl_threshold and "kl" not in ignore:
        return "kl"
    if rec["steering"] < induce_threshold and "induce" not in ignore:
        return "induce"
    return None


def select_direction(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    candidates: DimCandidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    prune_layer_frac: float = 0.2,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    exhaustive: bool = False,
    strict: bool = False,
    fast: bool = True,
    checkpoint: str | Path | None = None,
) -> Selection:
    """Score DIM candidates on validation prompts and pick one (see module docstring)."""
    if not harmful_val or not harmless_val:
        raise ConfigError("selection needs non-empty harmful and harmless validation prompts")
    max_layer = int(adapter.n_layers * (1 - prune_layer_frac))
    grid = [(p, l) for p in (positions or candidates.positions) for l in (layers or candidates.layers)]
    for p, l in grid:
        if l not in candidates.layers or p not in candidates.positions:
            raise ConfigError(f"no DIM candidate at position {p}, layer {l}")
    eligible = [(p, l) for p, l in grid if l < max_layer]
    if not eligible:
        raise ConfigError(f"every candidate layer is in the last {prune_layer_frac:.0%} of layers (>= {max_layer})")

    scorer = _Scorer(adapter, chat, harmful_val, harmless_val, batch_size,
                     sorted({l for _, l in eligible}), fast and supports_prefix_reuse(adapter))
    ckpt = SelectionCheckpoint(checkpoint, candidates, eligible, harmful_val, harmless_val, refusal_ids, batch_size)
    base_harmless = scorer.baseline_harmless()
    base_harmful_score = float(refusal_score(scorer.harmful(), refusal_ids).mean())
    base_harmless_score = float(refusal_score(base_harmless, refusal_ids).mean())
    records: dict[tuple[int, int], dict] = {}
    with progress(len(eligible), "select: ablation refusal score") as bar:
        for p, l in eligible:
            d = candidates.at(layer=l, position=p)
            rec = ckpt.get("refusal", p, l)
            if rec is None:
                score = float(refusal_score(scorer.harmful(DirectionalAblation.from_directions(d)), refusal_ids).mean())
                rec = ckpt.put("refusal", p, l, {"position": p, "layer": l, "refusal": score, "norm": float(d.norms[0])})
            records[(p, l)] = dict(rec)
            bar.update(1)
    ordered = sorted(eligible, key=lambda pl: records[pl]["refusal"])
    chosen = None
    with progress(len(ordered), "select: KL + induce filters") as bar:
        for p, l in ordered:
            rec, d = records[(p, l)], candidates.at(layer=l, position=p)
            filt = ckpt.get("filters", p, l)
            if filt is None:
                kl = float(next_token_kl(base_harmless, scorer.harmless(DirectionalAblation.from_directions(d))).mean())
                steer = scorer.harmless(ActAdd.from_directions(d, 1.0), start_layer=l)
                filt = ckpt.put("filters", p, l, {"kl": kl, "steering": float(refusal_score(steer, refusal_ids).mean())})
            rec.update(filt)
            reason = _filter_reason(rec, kl_threshold, induce_threshold)
            rec["status"] = "ok" if reason is None else f"filtered:{reason}"
            bar.update(1)
            if reason is None and chosen is None:
                chosen = (p, l)
                if not exhaustive:
                    break
    relaxed: list[str] = []
    if chosen is None and not strict:  # every candidate now has kl and steering computed
        for n_relaxed in range(1, len(RELAXATION_ORDER) + 1):
            ignore = RELAXATION_ORDER[:n_relaxed]
            passing = [pl for pl in ordered if _filter_reason(records[pl], kl_threshold, induce_threshold, ignore) is None]
            if passing:
                chosen, relaxed = passing[0], list(ignore)
                records[chosen]["status"] = "ok:relaxed:" + "+".join(ignore)
                break
    scores = [records[(p, l)] for p, l in grid if (p, l) in records]
    for rec in scores:
        rec.setdefault("status", "not_evaluated")
    for p, l in grid:
        if l >= max_layer:
            scores.append({"position": p, "layer": l, "status": "filtered:late_layer"})
    baseline = {"harmful_refusal_score": base_harmful_score, "harmless_refusal_score": base_harmless_score}
    if chosen is None:
        return Selection(direction=None, scores=scores, baseline=baseline)
    direction = candidates.at(layer=chosen[1], position=chosen[0])
    direction.meta.update({k: records[chosen][k] for k in ("refusal", "kl", "steering")})
    direction.meta["relaxed_filters"] = relaxed
    return Selection(direction=direction, scores=scores, baseline=baseline, relaxed=relaxed)


class DirectionSelector(Estimator):
    """Arditi-style selection as an estimator (parameters: :func:`select_direction`).

    ``DirectionSelector(kl_threshold=0.1).fit(adapter, chat, candidates, harmful_val, harmless_val,
    refusal_ids)``; ``candidates`` is a :class:`DimCandidates` or a fitted :class:`DIM`. After ``fit``:
    ``best_`` (the chosen candidate, a DirectionSet; None only with ``strict=True`` when nothing
    passed), ``directions_`` (the same), ``scores_`` (one record per candidate), ``baseline_`` (the
    unedited refusal scores) and ``relaxed_`` (filters dropped because every candidate failed them).
    """

    fitted_attributes = ("best_", "directions_", "scores_", "baseline_", "relaxed_")

    def __init__(self, *, kl_threshold: float = 0.1, induce_threshold: float = 0.0, prune_layer_frac: float = 0.2,
                 layers: Sequence[int] | None = None, positions: Sequence[int] | None = None, batch_size: int = 16,
                 exhaustive: bool = False, strict: bool = False, fast: bool = True,
                 checkpoint: str | Path | None = None):
        self.kl_threshold = kl_threshold
        self.induce_threshold = induce_threshold
        self.prune_layer_frac = prune_layer_frac
        self.layers = layers
        self.positions = positions
        self.batch_size = batch_size
        self.exhaustive = exhaustive
        self.strict = strict
        self.fast = fast
        self.checkpoint = checkpoint

    def fit(self, adapter: ModelAdapter, chat: ChatFormatter, candidates: DimCandidates | DIM,
            harmful_val: Sequence[str], harmless_val: Sequence[str], refusal_ids: Sequence[int]) -> DirectionSelector:
        if isinstance(candidates, DIM):
            candidates = candidates.candidates_
        sel = select_direction(adapter, chat, candidates, harmful_val, harmless_val, refusal_ids, **self.get_params())
        self.best_ = self.directions_ = sel.direction
        self.scores_, self.baseline_, self.relaxed_ = sel.scores, sel.baseline, sel.relaxed
        return self


class _Scorer:
    """Next-token log-probs on the two validation sets, the fast way or the plain way."""

    def __init__(self, adapter, chat, harmful, harmless, batch_size, capture_layers, fast):
        self.adapter, self.chat, self.batch_size, self.fast = adapter, chat, batch_size, fast
        self.harmful_prompts, self.harmless_prompts = list(harmful), list(harmless)
        self.capture_layers = capture_layers
        if fast:
            self.harmful_plan = PrefixPlan(adapter, chat, harmful, batch_size)
            self.harmless_plan = PrefixPlan(adapter, chat, harmless, batch_size)
        self.clean_inputs: dict[int, dict[int, object]] = {}  # batch -> layer -> clean block input

    def baseline_harmless(self):
        if not self.fast:
            return self._plain(self.harmless_prompts)
        logp, self.clean_inputs = plan_logprobs(self.harmless_plan, capture=self.capture_layers)
        return logp

    def harmful(self, spec=None):
        return plan_logprobs(self.harmful_plan, spec)[0] if self.fast else self._plain(self.harmful_prompts, spec)

    def harmless(self, spec, start_layer: int | None = None):
        if not self.fast:
            return self._plain(self.harmless_prompts, spec)
        if start_layer is None or not self.clean_inputs:
            return plan_logprobs(self.harmless_plan, spec)[0]
        hidden = {b: layers[start_layer] for b, layers in self.clean_inputs.items()}
        return plan_logprobs(self.harmless_plan, spec, start_layer=start_layer, start_hidden=hidden)[0]

    def _plain(self, prompts, spec=None):
        return next_token_logprobs(self.adapter, self.chat, prompts, batch_size=self.batch_size, intervention=spec,
                                   reuse_prefix=False)
