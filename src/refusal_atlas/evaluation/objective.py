"""The cheap two-number score of an ablation on validation prompts, shared by the subset search
(search/) and the model selection of the gradient methods (directions/optim.py).

Refusal: the mean logit refusal score on harmful prompts with the directions ablated (or an edit applied) (one forward
pass each, lower = less refusal). Damage: the mean next-token KL on harmless prompts against the
unmodified model, whose log-probs are computed once, on first use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.refusal import mean_refusal_score, next_token_logprobs
from refusal_atlas.edits.ablation import DirectionalAblation
from refusal_atlas.edits.projection import AblationMode


class ValidationObjective:
    """(mean refusal score on harmful val, mean next-token KL on harmless val) under ablation."""

    def __init__(self, adapter, chat, harmful: Sequence[str], harmless: Sequence[str], refusal_ids: Sequence[int],
                 *, batch_size: int = 16, mode: AblationMode = "subspace"):
        if not harmful or not harmless:
            raise ConfigError("validation needs harmful and harmless prompts")
        self.adapter, self.chat, self.mode, self.batch_size = adapter, chat, mode, batch_size
        self.harmful, self.harmless, self.refusal_ids = list(harmful), list(harmless), list(refusal_ids)
        self._base_lp: torch.Tensor | None = None
        self._base_refusal: float | None = None

    def fingerprint(self) -> str:
        """Identifies the prompts and mode, so a study is never resumed with another objective."""
        text = "\x00".join([self.mode, *self.harmful, "\x01", *self.harmless])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _harmless_base(self) -> torch.Tensor:
        if self._base_lp is None:
            self._base_lp = next_token_logprobs(self.adapter, self.chat, self.harmless, self.batch_size)
        return self._base_lp

    def baseline(self) -> dict[str, float]:
        """The unmodified model's scores (KL 0 by definition)."""
        if self._base_refusal is None:
            self._base_refusal = mean_refusal_score(self.adapter, self.chat, self.harmful, self.refusal_ids,
                                                    batch_size=self.batch_size)
        return {"refusal": self._base_refusal, "kl": 0.0}

    def __call__(self, directions) -> tuple[float, float]:
        """Ablate ``directions`` (a DirectionSet or [k, d] rows) together, or apply an Edit; return (refusal, KL).

        An :class:`~refusal_atlas.edits.Edit` is applied in the form it is exported in (``Edit.apply``).
        """
        base = self._harmless_base()
        spec = directions if hasattr(directions, "apply") else DirectionalAblation.from_directions(directions,
                                                                                                    self.mode)
        refusal = mean_refusal_score(self.adapter, self.chat, self.harmful, self.refusal_ids, spec, self.batch_size)
        new = next_token_logprobs(self.adapter, self.chat, self.harmless, self.batch_size, intervention=spec)
        return refusal, float(next_token_kl(base, new).mean())
