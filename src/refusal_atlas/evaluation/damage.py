"""Damage metrics: how much an intervention changes the model where it should change nothing.

* KL on harmless prompts, first token and over the first n generated tokens. The n-token KL is
  teacher-forced on the *clean* model's greedy continuation: both models read the same tokens and
  we compare their next-token distributions at each step, so the number measures the intervention
  and not the divergence of two different texts.
* Over-refusal (XSTest safe prompts) and induced refusal (ActAdd on harmless prompts) are refusal
  rates on safe prompts; :func:`refusal_metric` names them so records say which is which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusal_atlas.core.batching import length_sorted_batches
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.model.generation import greedy_generate
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.core.progress import progress


def next_token_kl(base_logprobs: torch.Tensor, new_logprobs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-prompt KL(P_base ‖ P_new) of the next-token distribution (float64, Arditi's epsilon)."""
    return kl_against(*kl_base_terms(base_logprobs, eps), new_logprobs, eps)


def kl_base_terms(base_logprobs: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The base side of :func:`next_token_kl`: P_base and Σ P_base·log(P_base + eps) per prompt. A search
    compares many edits with one base, so it computes these once (two of the four passes over the vocabulary)."""
    p = base_logprobs.to(torch.float64).exp()
    return p, (p * torch.log(p + eps)).sum(dim=-1)


def kl_against(p: torch.Tensor, p_log_p: torch.Tensor, new_logprobs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(P_base ‖ P_new) per prompt from :func:`kl_base_terms` of the base and the new log-probs."""
    q = new_logprobs.to(torch.float64).exp()
    return p_log_p - (p * torch.log(q + eps)).sum(dim=-1)


def refusal_metric(role: str, kind: str) -> str:
    """Name of the rate a (prompt role, intervention kind) pair measures."""
    if role == "over_refusal":
        return "over_refusal_rate"
    if role == "harmless" and kind == "actadd":
        return "induced_refusal_rate"
    return "refusal_rate"


def greedy_continuations(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    instructions: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    intervention=None,
    desc: str = "continuations",
) -> list[list[int]]:
    """Greedy continuation token ids per prompt, cut after the first end-of-turn token (kept).

    Greedy decoding is deterministic, so the first k ids of a length-n continuation are exactly
    the continuation of length k (k ≤ n) — longer runs can be truncated instead of regenerated.
    """
    gens = greedy_generate(adapter, chat, instructions, max_new_tokens, batch_size, intervention, desc=desc)
    return [g.token_ids for g in gens]


def _forward_positions(adapter, batch, conts: list[list[int]], width: int, pad_id: int) -> torch.Tensor:
    """Log-probs [B, width, V] at the positions that predict each continuation token."""
    rows = torch.full((len(conts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(conts), width), dtype=torch.long)
    for r, ids in enumerate(conts):
        rows[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[r, :len(ids)] = 1
    device = adapter.device
    input_ids = torch.cat([batch["input_ids"], rows.to(device)], dim=1)
    attn = torch.cat([batch["attention_mask"], mask.to(device)], dim=1)
    pos = (attn.cumsum(dim=1) - 1).clamp_min(0)
    prompt_len = batch["input_ids"].shape[1]
    logits = adapter.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    return torch.log_softmax(logits[:, prompt_len - 1: prompt_len - 1 + width].to(torch.float64), dim=-1)


@torch.inference_mode()
def continuation_kl(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    instructions: Sequence[str],
    continuations: Sequence[Sequence[int]],
    intervention,
    batch_size: int = 8,
    eps: float = 1e-6,
    desc: str | None = None,
) -> torch.Tensor:
    """Per-prompt, per-step KL(clean ‖ intervened) → [N, T] float64, NaN past each continuation's end.

    Column 0 is the first-token KL (it reads only the prompt); an empty continuation still gives
    column 0. The clean and intervened passes run batch by batch so only [B, T] values are kept.
    """
    width = max(1, max((len(c) for c in continuations), default=1))
    out = torch.full((len(instructions), width), float("nan"), dtype=torch.float64)
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else 0
    with progress(len(instructions), desc or "teacher-forced KL", enabled=desc is not None) as bar:
        for idx in length_sorted_batches(chat.token_lengths(instructions), batch_size):
            batch = chat.encode([instructions[i] for i in idx], device=adapter.device)
            conts = [list(continuations[i]) for i in idx]
            w = max(1, max(len(c) for c in conts))
            clean = _forward_positions(adapter, batch, conts, w, pad)
            with intervention.apply(adapter):
                new = _forward_positions(adapter, batch, conts, w, pad)
            p = clean.exp()
            kl = (p * (torch.log(p + eps) - torch.log(new.exp() + eps))).sum(dim=-1).cpu()
            for r, i in enumerate(idx):
                n = max(1, len(conts[r]))
                out[i, :n] = kl[r, :n]
            bar.update(len(idx))
    return out


def kl_records(kl: torch.Tensor, n_tokens: int) -> list[dict]:
    """Two metrics records (first token; mean over the first ``n_tokens`` steps) with bootstrap CIs."""
    first = mean_record(kl[:, 0].tolist())
    multi = mean_record(torch.nanmean(kl[:, :n_tokens], dim=1).tolist())
    steps = int((~torch.isnan(kl[:, :n_tokens])).sum())
    return [
        {"metric": "kl_first_token", "n": first["n"], "kl": first["mean"], "ci95": first["ci95"]},
        {"metric": f"kl_first_{n_tokens}_tokens", "n": multi["n"], "kl": multi["mean"], "ci95": multi["ci95"],
         "kl_tokens": n_tokens, "token_steps": steps},
    ]
