"""Arditi-style choice of one DIM candidate (position, layer).

For each candidate r: (1) refusal score on harmful val prompts with r ablated everywhere (lower is
better), (2) KL of the next-token distribution on harmless val prompts under that ablation, and
(3) the steering score: refusal score on harmless val prompts with +r added at its layer. A
candidate is dropped if KL > ``kl_threshold``, steering < ``induce_threshold`` (it cannot induce
refusal), or it sits in the last ``prune_layer_frac`` of layers. The winner is the survivor with
the lowest ablation refusal score.

Cost cut: (1) is computed for every candidate; (2) and (3) only in increasing order of (1) until
the first survivor, which gives the same winner as computing everything. ``exhaustive=True``
computes all three for every candidate (for plots).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    direction: DirectionSet
    scores: list[dict]  # one record per candidate: position, layer, refusal, kl, steering, status
    baseline: dict


def _filter_reason(rec: dict, kl_threshold: float, induce_threshold: float) -> str | None:
    if any(isinstance(rec.get(k), float) and math.isnan(rec[k]) for k in ("refusal", "kl", "steering")):
        return "nan"
    if rec["kl"] > kl_threshold:
        return "kl"
    if rec["steering"] < induce_threshold:
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
    if chosen is None:
        raise ConfigError(
            f"no DIM candidate passed the filters (KL <= {kl_threshold}, steering >= {induce_threshold}); "
            "relax --kl-threshold/--induce-threshold or use more validation prompts"
        )
    scores = [records[(p, l)] for p, l in grid if (p, l) in records]
    for rec in scores:
        rec.setdefault("status", "not_evaluated")
    for p, l in grid:
        if l >= max_layer:
            scores.append({"position": p, "layer": l, "status": "filtered:late_layer"})
    direction = candidates.at(chosen[1], chosen[0])
    direction.meta.update({k: records[chosen][k] for k in ("refusal", "kl", "steering")})
    baseline = {"harmful_refusal_score": base_harmful_score, "harmless_refusal_score": base_harmless_score}
    return Selection(direction=direction, scores=scores, baseline=baseline)
