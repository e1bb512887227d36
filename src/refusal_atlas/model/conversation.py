"""Multi-turn chat with one model, streamed token by token, optionally under an intervention.

Greedy decoding with a KV cache, one token per step, so a terminal can show each piece as it
comes (generation.py batches whole completions instead). Each Conversation keeps its own history:
an edited model's earlier answers are its own, not the original's.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from refusal_atlas.core.errors import ModelError
from refusal_atlas.model.generation import stop_token_ids
from refusal_atlas.model.adapter import ModelAdapter


@torch.inference_mode()
def stream_reply(adapter: ModelAdapter, tokenizer, messages: list[dict], intervention=None,
                 max_new_tokens: int = 128) -> Iterator[str]:
    """Yield the greedy reply to ``messages`` piece by piece (text, special tokens stripped)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors come in many types
        raise ModelError(f"the chat template failed to render: {exc}") from None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(adapter.device)
    eos = set(stop_token_ids(adapter.model, tokenizer))
    generated: list[int] = []
    shown = ""
    # transformers 5.x renames the forward's past_key_values to cache (5.40 drops the old name)
    key = "cache" if "cache" in inspect.signature(adapter.model.forward).parameters else "past_key_values"
    with intervention.apply(adapter) if intervention is not None else nullcontext():
        past, step_input = None, ids
        for _ in range(max_new_tokens):
            out = adapter.model(input_ids=step_input, use_cache=True, **{key: past})
            past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            token = int(out.logits[0, -1].argmax())
            if token in eos:
                break
            generated.append(token)
            step_input = torch.tensor([[token]], device=ids.device)
            decoded = tokenizer.decode(generated, skip_special_tokens=True)
            if decoded.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                continue
            if len(decoded) > len(shown):
                yield decoded[len(shown):]
                shown = decoded


@dataclass
class Conversation:
    """One model's side of a chat: its history, a system prompt (None: the template's default), an edit."""

    adapter: ModelAdapter
    tokenizer: object
    intervention: object = None
    system: str | None = None
    max_new_tokens: int = 128
    history: list[dict] = field(default_factory=list)

    def messages(self, user: str) -> list[dict]:
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        return head + self.history + [{"role": "user", "content": user}]

    def reply(self, user: str) -> Iterator[str]:
        """Stream the answer to ``user``; the turn enters the history once the answer is complete."""
        pieces: list[str] = []
        for piece in stream_reply(self.adapter, self.tokenizer, self.messages(user), self.intervention,
                                  self.max_new_tokens):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(pieces).strip()}]

    def reset(self) -> None:
        self.history.clear()
