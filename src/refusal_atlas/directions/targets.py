"""Training targets for the gradient methods, written by the model itself under the DIM direction.

* t_answer: harmful prompts completed with r_DIM ablated (what "not refusing" looks like for this
  model);
* t_refusal: harmless prompts completed with α·r̂_DIM added at the DIM layer (α = ‖r_DIM‖), cut
  after the first sentence, so the target is the refusal opening rather than what a steered model
  rambles on into;
* t_retain: clean completions of the harmless prompts (the behaviour to keep).

Greedy decoding, ``max_new_tokens`` (default 30) each. Model-specific targets avoid needing an
uncensored helper model. With ``cache=`` (the run directory's ``targets.json``) they are written as
JSON and reused only when the prompts, the DIM direction and the generation settings all match.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.model.generation import DECODING, generate
from refusal_atlas.edits import ActAdd, DirectionalAblation
from refusal_atlas.core.io import read_json, write_json
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str) -> str:
    """Text up to and including the first sentence-ending mark (all of it if there is none).

    The seed code cuts before the first "." and drops it; keeping the mark gives the target a
    natural end and also handles "!"/"?". A "." inside a number or name ("3.5", "e.g") is not an
    end because it is not followed by whitespace.
    """
    m = _SENTENCE_END.search(text)
    return text[: m.end()].strip() if m else text.strip()


@dataclass
class Targets:
    """Paired prompts and targets: ``answer[i]`` belongs to ``harmful[i]``, the others to ``harmless[i]``."""

    harmful: list[str]
    harmless: list[str]
    answer: list[str]
    refusal: list[str]
    retain: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.answer) != len(self.harmful):
            raise ConfigError("t_answer must have one target per harmful prompt")
        if not len(self.refusal) == len(self.retain) == len(self.harmless):
            raise ConfigError("t_refusal and t_retain must have one target per harmless prompt")
        if not self.harmful or not self.harmless:
            raise ConfigError("targets need at least one harmful and one harmless prompt")

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta,
                "answer": [{"instruction": p, "target": t} for p, t in zip(self.harmful, self.answer)],
                "harmless": [{"instruction": p, "refusal": r, "retain": k}
                             for p, r, k in zip(self.harmless, self.refusal, self.retain)]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Targets:
        try:
            return cls([r["instruction"] for r in data["answer"]], [r["instruction"] for r in data["harmless"]],
                       [r["target"] for r in data["answer"]], [r["refusal"] for r in data["harmless"]],
                       [r["retain"] for r in data["harmless"]], dict(data.get("meta", {})))
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"malformed targets file (missing {exc})") from None


def direction_fingerprint(direction: DirectionSet) -> str:
    """Short hash of a direction's values and place, to tell whether cached targets still apply."""
    h = hashlib.sha256(direction.vectors.to(torch.float32).contiguous().numpy().tobytes())
    h.update(f"{direction.layer}:{direction.position}".encode())
    return h.hexdigest()[:16]


def build_targets(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    dim: DirectionSet | None,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    max_new_tokens: int = 30,
    batch_size: int = 16,
    cache: str | Path | None = None,
) -> Targets:
    """Generate t_answer, t_refusal and t_retain greedily with the DIM interventions.

    With ``cache``, a file made from the same prompts, DIM direction and ``max_new_tokens`` is
    reused (meta["cached"] = True); otherwise the targets are generated and written there.
    """
    if dim is None:
        raise ConfigError("targets need the DIM direction (t_answer ablates it, t_refusal adds it)")
    if len(dim) != 1:
        raise ConfigError(f"targets need one DIM direction, got {len(dim)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache is not None and Path(cache).exists():
        cached = Targets.from_json(read_json(cache))
        if (cached.harmful == list(harmful) and cached.harmless == list(harmless)
                and cached.meta.get("dim") == direction_fingerprint(dim)
                and cached.meta.get("max_new_tokens") == max_new_tokens
                and cached.meta.get("decoding") == DECODING):  # older caches may carry a leaked repetition penalty
            cached.meta["cached"] = True
            return cached
    alpha = float(dim.norms[0])
    ablation = DirectionalAblation.from_directions(dim, label="targets:ablate-dim")
    addition = ActAdd.from_directions(DirectionSet(dim.unit() * alpha, dim.layer, "dim", dim.position), 1.0,
                                      label="targets:add-dim")
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    answer = generate(adapter, chat, list(harmful), intervention=ablation, desc="targets: t_answer", **kw)
    refusal = generate(adapter, chat, list(harmless), intervention=addition, desc="targets: t_refusal", **kw)
    retain = generate(adapter, chat, list(harmless), desc="targets: t_retain", **kw)
    meta = {"max_new_tokens": max_new_tokens, "dim": direction_fingerprint(dim), "dim_layer": dim.layer,
            "alpha": alpha, "refusal_cut": "first sentence", "decoding": DECODING}
    targets = Targets(list(harmful), list(harmless), answer, [first_sentence(t) for t in refusal], retain, meta)
    if cache is not None:
        write_json(cache, targets.to_json())
    return targets
