"""Batched greedy generation with hooks active: pure argmax decoding, shared-prefix reuse, early stop.

Greedy means argmax and nothing else: the model's own ``generation_config`` (Qwen ships
``repetition_penalty=1.1``, sampling temperatures, ...) never reaches our generations. The fast
path is our own KV-cached argmax loop on top of the shared chat-template prefix (prefix_cache),
dropping each row from the batch once it is finished; ``fast=False`` (and models the prefix path
does not support) use HF ``generate`` with a clean :class:`GenerationConfig` swapped in. Both give
the same tokens as a hand-written argmax loop (tested). :data:`DECODING` is what runs record.

A row finishes on an end-of-turn token (kept), at ``max_new_tokens``, or when ``stop_when(ids)``
says its outcome is decided (e.g. a refusal phrase appeared, so the substring verdict is fixed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig

from refusal_atlas.core.batching import length_sorted_batches
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.prefix_cache import PrefixPlan, supports_prefix_reuse
from refusal_atlas.core.progress import progress

# The effective decoding settings of every generation (recorded in manifests and targets).
DECODING: dict = {"strategy": "greedy", "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0,
                  "no_repeat_ngram_size": 0, "temperature": None, "top_k": None, "top_p": None,
                  "model_generation_config": "ignored"}


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@dataclass
class Generated:
    token_ids: list[int]  # cut after the first end-of-turn token (kept)
    stop: str  # "eos", "max_new_tokens" or "decided" (stop_when fired: shorter than a full run)
    first_logprobs: torch.Tensor | None = None  # [V] float32 next-token log-probs at the prompt's end


def clean_generation_config(eos: list[int], pad_id: int | None) -> GenerationConfig:
    """A GenerationConfig with every logits processor neutral: argmax of the raw logits."""
    return GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            eos_token_id=eos, pad_token_id=pad_id, bos_token_id=None)


@contextmanager
def _model_generation_config(model, config: GenerationConfig):
    """HF fills unset generation values from ``model.generation_config``: swap in a clean one."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def _cut(ids: list[int], eos: list[int]) -> list[int]:
    return ids[: next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))]


def _plain(adapter, chat, instructions, idx, max_new_tokens, eos) -> list[Generated]:
    batch = chat.encode([instructions[i] for i in idx], device=adapter.device)
    config = clean_generation_config(eos, chat.tokenizer.pad_token_id)
    config.max_new_tokens = max_new_tokens
    with _model_generation_config(adapter.model, config):
        seqs = adapter.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      generation_config=config)
    out = []
    for ids in seqs[:, batch["input_ids"].shape[1]:].tolist():
        ids = _cut(ids, eos)
        out.append(Generated(ids, "eos" if ids and ids[-1] in eos else "max_new_tokens"))
    return out


def _fast(adapter, plan: PrefixPlan, kv, idx, max_new_tokens, eos, stop_when, keep_first) -> list[Generated]:
    """Our argmax loop: prefix cache + one pass over the suffixes, then one token per step for live rows."""
    inputs = plan.inputs(idx, kv)
    cache = inputs.pop("cache", None) or DynamicCache(config=adapter.model.config)
    mask, pos = inputs["attention_mask"], inputs["position_ids"][:, -1:]
    logits = adapter.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    first = (torch.log_softmax(logits.to(torch.float64), dim=-1).to(torch.float32).cpu() if keep_first
             else [None] * len(idx))
    toks: list[list[int]] = [[] for _ in idx]
    stops = ["max_new_tokens"] * len(idx)
    live = list(range(len(idx)))
    for step in range(max_new_tokens):
        nxt = logits.to(torch.float32).argmax(dim=-1)
        keep = []
        for j, (r, t) in enumerate(zip(live, nxt.tolist())):
            toks[r].append(t)
            if t in eos:
                stops[r] = "eos"
            elif stop_when is not None and step + 1 < max_new_tokens and stop_when(toks[r]):
                stops[r] = "decided"
            else:
                keep.append(j)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(sel)
            mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
            live = [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        pos = pos + 1
        logits = adapter.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1]
    return [Generated(t, s, f) for t, s, f in zip(toks, stops, first)]


@torch.inference_mode()
def greedy_generate(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    instructions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    intervention=None,
    desc: str = "generate",
    stop_when: Callable[[list[int]], bool] | None = None,
    fast: bool = True,
    keep_first_logprobs: bool = False,
) -> list[Generated]:
    """Greedy token ids per prompt (see module docstring), in the order of ``instructions``.

    ``keep_first_logprobs``: also keep each row's first-step log-probs (the next-token distribution
    a KL needs), which the prefill computes anyway (fast path only; None on the plain path).
    """
    eos = stop_token_ids(adapter.model, chat.tokenizer)
    out: list[Generated | None] = [None] * len(instructions)
    fast = fast and supports_prefix_reuse(adapter) and len(instructions) > 0
    if stop_when is not None and not fast:
        raise ValueError("stop_when needs the fast generation path")
    with ExitStack() as stack:
        bar = stack.enter_context(progress(len(instructions), desc))
        stack.enter_context(intervention.apply(adapter) if intervention is not None else nullcontext())
        if fast:
            plan = PrefixPlan(adapter, chat, instructions, batch_size)
            batches = list(length_sorted_batches([len(s) for s in plan.suffixes], batch_size))
            kv = plan.prefix_kv()
        else:
            batches = list(length_sorted_batches(chat.token_lengths(instructions), batch_size))
        for idx in batches:
            rows = (_fast(adapter, plan, kv, idx, max_new_tokens, eos, stop_when, keep_first_logprobs) if fast
                    else _plain(adapter, chat, instructions, idx, max_new_tokens, eos))
            for i, g in zip(idx, rows):
                out[i] = g
            bar.update(len(idx))
    return [g for g in out if g is not None]


def generate(adapter: ModelAdapter, chat: ChatFormatter, instructions: Sequence[str], *args, **kwargs) -> list[str]:
    """Greedy completions (special tokens stripped), in the order of ``instructions``.

    Takes :func:`greedy_generate`'s arguments (``max_new_tokens``, ``batch_size``, ``intervention``, ...).
    """
    gens = greedy_generate(adapter, chat, instructions, *args, **kwargs)
    return [chat.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in gens]


def greedy_on_plan(adapter: ModelAdapter, plan: PrefixPlan, kv, idx: Sequence[int], max_new_tokens: int,
                   stop_when: Callable[[list[int]], bool] | None = None, keep_first_logprobs: bool = False
                   ) -> list[Generated]:
    """Greedy decoding of rows ``idx`` of ``plan`` on prefix keys/values the caller already computed (under
    whatever edit is active), so a caller scoring one edit several ways runs the prefix once."""
    with torch.inference_mode():
        return _fast(adapter, plan, kv, list(idx), max_new_tokens, stop_token_ids(adapter.model, plan.chat.tokenizer),
                     stop_when, keep_first_logprobs)
