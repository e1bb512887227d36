"""Chat formatting: the model's template, left padding, and the post-instruction token positions.

The "post-instruction" (end-of-instruction, eoi) tokens are whatever the chat template puts after
the user's text, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML. With left padding they
are the last ``n_eoi`` tokens of every row, addressed by negative positions ``-n_eoi..-1``.

System-prompt policy: ``system=None`` passes no system message, so the template's own default
applies (Qwen2.5 inserts "You are Qwen, ..."; Llama-3 and Gemma insert none). A string is sent as
the system message. The policy is recorded in every run manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusal_atlas.core.errors import ModelError

_MARKER = "\u2063REFUSAL_ATLAS_INSTRUCTION\u2063"


class ChatFormatter:
    """Turn instructions into left-padded token batches with known post-instruction positions."""

    def __init__(self, tokenizer, system: str | None = None, chat_template: str | None = None):
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                "this model's tokenizer has no chat template; refusal directions are defined relative to "
                "the chat format, so pass one (chat_template=..., CLI --chat-template FILE)"
            )
        self.tokenizer = tokenizer
        self.system = system
        rendered = self.render(_MARKER)
        if rendered.count(_MARKER) != 1:
            raise ModelError("the chat template does not place the user message exactly once")
        prefix, self.eoi_text = rendered.split(_MARKER)
        self.eoi_ids: list[int] = tokenizer(self.eoi_text, add_special_tokens=False)["input_ids"]
        if not self.eoi_ids:
            raise ModelError("the chat template adds no tokens after the instruction; cannot locate positions")

    @property
    def n_eoi(self) -> int:
        return len(self.eoi_ids)

    def render(self, instruction: str) -> str:
        messages = [{"role": "user", "content": instruction}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors come in many types
            raise ModelError(f"the chat template failed to render: {exc}") from None

    def encode(self, instructions: Sequence[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tokenize a batch, left-padded. Special tokens come from the template itself (no double BOS)."""
        texts = [self.render(x) for x in instructions]
        batch = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        tail = batch["input_ids"][:, -self.n_eoi:]
        expected = torch.tensor(self.eoi_ids).expand_as(tail)
        if not torch.equal(tail, expected):
            bad = int((tail != expected).any(dim=1).nonzero()[0])
            raise ModelError(
                f"post-instruction tokens not found at the end of prompt {bad}; the tokenizer merges across "
                "the template boundary or does not pad on the left"
            )
        mask = batch["attention_mask"]
        # positions as if unpadded, so a left-padded row computes exactly what it would alone
        position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": mask.to(device),
                "position_ids": position_ids.to(device)}

    def token_lengths(self, instructions: Sequence[str]) -> list[int]:
        """Unpadded token counts, used to sort prompts by length and cut padding."""
        texts = [self.render(x) for x in instructions]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def positions(self, positions: Sequence[int] | None) -> list[int]:
        """Validate negative post-instruction positions; ``None`` means all of them."""
        if positions is None:
            return list(range(-self.n_eoi, 0))
        for p in positions:
            if not -self.n_eoi <= p <= -1:
                raise ModelError(f"position {p} is not a post-instruction position (valid: -{self.n_eoi}..-1)")
        return list(positions)
