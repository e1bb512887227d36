"""Losses shared by the gradient methods (RDO, cones, RepInd), batched with left padding.

Each training sequence is ``chat(prompt) ⊕ target``; the prompt and target are tokenized
separately and concatenated, so the boundary between "context" and "tokens we score" is exact
(re-tokenizing the joined text can merge tokens across it). Rows are left-padded, which puts every
row's target at the END of the sequence: the logits that predict target tokens are then the last
``T + 1`` positions for every row (T = longest target), so we ask the model for only those
(``logits_to_keep``) and skip the vocabulary projection everywhere else.

* ablation CE: harmful prompt → t_answer, with the direction ablated everywhere;
* addition CE: harmless prompt → t_refusal, with α·r̂ added at the DIM layer;
* retain KL: harmless prompt → t_retain, KL(P_base ‖ P_ablated) at the target positions.

All three are means over target tokens (token-weighted over the batch), so their scale does not
depend on target length or batch size. KL direction: we use KL(P_base ‖ P_intervened), the same
divergence the selection and evaluation steps report (Arditi's next-token KL), averaged over the
target positions. The seed code uses the reverse KL(P_int ‖ P_base) *summed* over 30 positions;
summing makes the retain weight silently depend on the target length, and using a different
divergence for training than for model selection makes the trade-off harder to read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.edits.actadd import add_activation
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter


@dataclass(frozen=True)
class Example:
    """One training sequence as token ids: the templated prompt and the target continuation."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass
class Batch:
    """Left-padded sequences; ``labels``/``label_mask`` [B, T] cover the last T positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    prompt_end: torch.Tensor  # [B] index of each row's last prompt token

    @property
    def n_targets(self) -> int:
        return self.labels.shape[1]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


@dataclass(frozen=True)
class LossWeights:
    ablation: float = 1.0
    addition: float = 0.2
    retain: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ablation", "addition", "retain"):
            w = getattr(self, name)
            if not (w >= 0 and w == w):
                raise ConfigError(f"loss weight {name} must be >= 0, got {w}")


def tokenize_examples(chat: ChatFormatter, instructions: Sequence[str],
                      targets: Sequence[str] | Sequence[Sequence[int]]) -> list[Example]:
    """Prompt ids exactly as :meth:`ChatFormatter.encode` makes them, plus the target's ids.

    ``targets``: texts (tokenized here) or token ids, kept as they are: a model's own continuation given as
    ids scores exactly the tokens it produced (decoding and re-encoding text need not give them back)."""
    if len(instructions) != len(targets):
        raise ConfigError(f"{len(instructions)} prompts but {len(targets)} targets")
    tok = chat.tokenizer
    prompts = tok([chat.render(x) for x in instructions], add_special_tokens=False)["input_ids"]
    if targets and not isinstance(targets[0], str):
        tails = [list(t) for t in targets]
    else:
        tails = tok(list(targets), add_special_tokens=False)["input_ids"] if targets else []
    return [Example(tuple(p), tuple(int(x) for x in t)) for p, t in zip(prompts, tails)]


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Left-pad ``prompt ⊕ target`` rows; labels are the target tokens, aligned at the end."""
    if not examples:
        raise ConfigError("cannot collate an empty batch")
    seqs = [list(e.prompt_ids) + list(e.target_ids) for e in examples]
    width = max(len(s) for s in seqs)
    n_t = max(1, max(len(e.target_ids) for e in examples))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), n_t), pad_id, dtype=torch.long)
    label_mask = torch.zeros((len(seqs), n_t), dtype=torch.bool)
    prompt_end = torch.empty(len(seqs), dtype=torch.long)
    for i, (s, e) in enumerate(zip(seqs, examples)):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
        t = len(e.target_ids)
        if t:
            labels[i, n_t - t:] = torch.tensor(e.target_ids)
            label_mask[i, n_t - t:] = True
        prompt_end[i] = width - t - 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return Batch(ids.to(device), mask.to(device), position_ids.to(device), labels.to(device),
                 label_mask.to(device), prompt_end.to(device))


def target_logprobs(adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    """Log-probs [B, T, V] at the positions that predict the target tokens (current hooks apply)."""
    logits = adapter.model(**batch.model_inputs(), use_cache=False, logits_to_keep=batch.n_targets + 1).logits
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def masked_ce(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (0 with a graph if there are none)."""
    nll = -logp.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, batch.label_mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    return (values * mask).sum() / n.clamp_min(1)


def unit(direction: torch.Tensor) -> torch.Tensor:
    return direction / direction.norm().clamp_min(1e-12)


def ablation_ce(adapter: ModelAdapter, batch: Batch, direction: torch.Tensor,
                inner: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """CE of t_answer on harmful prompts with ``direction`` ablated at every layer and position.

    ``inner`` (e.g. RepInd's residual capture) is entered inside the ablation, so its hooks run
    after the projection and see the ablated stream.
    """
    with ablate(adapter, direction.unsqueeze(0), mode="sequential"), (inner() if inner else nullcontext()):
        return masked_ce(target_logprobs(adapter, batch), batch)


def addition_ce(adapter: ModelAdapter, batch: Batch, direction: torch.Tensor, alpha: float, layer: int) -> torch.Tensor:
    """CE of t_refusal on harmless prompts with α·r̂ added to the input of block ``layer``."""
    with add_activation(adapter, alpha * unit(direction), layer):
        return masked_ce(target_logprobs(adapter, batch), batch)


@torch.no_grad()
def base_logprobs(adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    """The unmodified model's log-probs at the target positions (the retain reference)."""
    return target_logprobs(adapter, batch)


def retain_kl(adapter: ModelAdapter, batch: Batch, direction: torch.Tensor,
              base: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over target positions of KL(P_base ‖ P_ablated) on harmless prompts → t_retain."""
    return kl_under(adapter, batch, lambda: ablate(adapter, direction.unsqueeze(0), mode="sequential"), base)


def kl_under(adapter: ModelAdapter, batch: Batch, intervention: Callable[[], AbstractContextManager],
             base: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over target positions of KL(P_base ‖ P_intervened), the intervention entered by ``intervention()``
    (the retain loss of every trained method: RDO's ablation, the ARA edit's hooks)."""
    if base is None:
        base = base_logprobs(adapter, batch)
    with intervention():
        new = target_logprobs(adapter, batch)
    kl = (base.exp() * (base - new)).sum(-1)
    return _masked_mean(kl, batch.label_mask)


@dataclass
class StepBatches:
    """The three batches of one micro-step (same examples, three roles)."""

    answer: Batch  # harmful prompts → t_answer
    refusal: Batch | None  # harmless prompts → t_refusal (None: no example of the step has one)
    retain: Batch  # harmless prompts → t_retain


def direction_loss(adapter: ModelAdapter, batches: StepBatches, direction: torch.Tensor, alpha: float,
                   layer: int, weights: LossWeights = LossWeights(),
                   inner: Callable[[], AbstractContextManager] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """λ_abl·CE_abl + λ_add·CE_add + λ_ret·KL_ret for one (unnormalized or unit) direction.

    Returns the differentiable total and the detached parts (for logging).
    """
    parts: dict[str, torch.Tensor] = {}
    total = direction.new_zeros(())
    if weights.ablation or inner is not None:
        parts["ablation"] = ablation_ce(adapter, batches.answer, direction, inner)
        total = total + weights.ablation * parts["ablation"]
    if weights.addition and batches.refusal is not None:
        parts["addition"] = addition_ce(adapter, batches.refusal, direction, alpha, layer)
        total = total + weights.addition * parts["addition"]
    if weights.retain:
        parts["retain"] = retain_kl(adapter, batches.retain, direction)
        total = total + weights.retain * parts["retain"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
