"""Batched greedy generation with hooks active (HF ``generate``, KV cache, early stop).

Prompts are sorted by length so a batch shares little padding; generation of a batch stops as
soon as every row has emitted an end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from refusal_atlas.batching import length_sorted_batches
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.progress import progress


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@torch.inference_mode()
def generate(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    instructions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    intervention=None,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions (special tokens stripped), in the order of ``instructions``."""
    tokenizer = chat.tokenizer
    eos = stop_token_ids(adapter.model, tokenizer)
    out: list[str] = [""] * len(instructions)
    with ExitStack() as stack:
        bar = stack.enter_context(progress(len(instructions), desc))
        if intervention is not None:
            stack.enter_context(intervention.apply(adapter))
        for idx in length_sorted_batches(chat.token_lengths(instructions), batch_size):
            batch = chat.encode([instructions[i] for i in idx], device=adapter.device)
            seqs = adapter.model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            )
            new = seqs[:, batch["input_ids"].shape[1]:]
            for row, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[row] = text.strip()
            bar.update(len(idx))
    return out
