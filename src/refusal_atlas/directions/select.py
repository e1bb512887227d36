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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import DimCandidates
from refusal_atlas.errors import ConfigError
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.interventions import Intervention
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.progress import progress


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

    def logp(prompts, spec=None):
        return next_token_logprobs(adapter, chat, prompts, batch_size=batch_size, intervention=spec)

    base_harmless = logp(harmless_val)
    base_harmful_score = float(refusal_score(logp(harmful_val), refusal_ids).mean())
    base_harmless_score = float(refusal_score(base_harmless, refusal_ids).mean())
    records: dict[tuple[int, int], dict] = {}
    with progress(len(eligible), "select: ablation refusal score") as bar:
        for p, l in eligible:
            d = candidates.at(l, p)
            score = float(refusal_score(logp(harmful_val, Intervention("ablate", d)), refusal_ids).mean())
            records[(p, l)] = {"position": p, "layer": l, "refusal": score, "norm": float(d.norms[0])}
            bar.update(1)
    ordered = sorted(eligible, key=lambda pl: records[pl]["refusal"])
    chosen = None
    with progress(len(ordered), "select: KL + induce filters") as bar:
        for p, l in ordered:
            rec, d = records[(p, l)], candidates.at(l, p)
            rec["kl"] = float(next_token_kl(base_harmless, logp(harmless_val, Intervention("ablate", d))).mean())
            steer = logp(harmless_val, Intervention("actadd", d, coeff=1.0))
            rec["steering"] = float(refusal_score(steer, refusal_ids).mean())
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
    direction = candidates.at(chosen[1], chosen[0])
    direction.meta.update({k: records[chosen][k] for k in ("refusal", "kl", "steering")})
    direction.meta["relaxed_filters"] = relaxed
    return Selection(direction=direction, scores=scores, baseline=baseline, relaxed=relaxed)
