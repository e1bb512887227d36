"""Shared-prefix reuse: the chat template's common opening is run once, not once per prompt.

Every prompt of a set starts with the same template tokens (Qwen2.5's default system message is
about 20 of them, often half the prompt). :class:`PrefixPlan` tokenizes a prompt set once, takes
the longest token prefix common to all of them (measured on the real token ids, so BPE merges at
the boundary cannot break it), runs that prefix once per intervention with the hooks active (an
ablation edits the prefix too, but identically for every prompt) and then runs only each prompt's
own tokens on top of the cached keys/values. Rows are laid out ``[prefix][pads][suffix]`` with
position ids continuing the prefix, so each row computes what it would compute alone: the same
numbers as the left-padded full pass up to float rounding (tested).

``start_layer`` skips blocks below an edit that only begins there (ActAdd at layer l): their block
inputs equal the clean pass, so the caller hands in the clean hidden states captured at layer l.

Only plain full-attention decoders take the fast path (:func:`supports_prefix_reuse`); others
(sliding windows, Gemma's embedding scale) use the plain full pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import DynamicCache

from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.hooks import Hooks

_FAST_TYPES = {"qwen2", "qwen3", "llama", "mistral"}  # no embedding scale, no logit soft-cap


def supports_prefix_reuse(adapter: ModelAdapter) -> bool:
    cfg = adapter.model.config
    full = all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"]))
    sliding = adapter.model_type == "mistral" and getattr(cfg, "sliding_window", None) is not None
    return adapter.model_type in _FAST_TYPES and full and not sliding


def budget_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Longest first, at most ``batch_size`` rows and about ``batch_size`` × median length padded tokens.

    A forward pass costs its padded tokens, so one long prompt does not make 31 short ones pay its length.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    median = sorted(lengths)[len(lengths) // 2] if lengths else 1
    budget = batch_size * max(1, median)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class PrefixPlan:
    """One prompt set, tokenized once: the common prefix, each prompt's suffix, fixed batches."""

    def __init__(self, adapter: ModelAdapter, chat: ChatFormatter, instructions: Sequence[str], batch_size: int):
        self.adapter, self.chat = adapter, chat
        ids = chat.tokenizer([chat.render(x) for x in instructions], add_special_tokens=False)["input_ids"]
        n = min(len(x) for x in ids) - 1  # every row keeps at least one token of its own
        first = ids[0]
        for row in ids[1:]:
            n = next((j for j in range(n) if row[j] != first[j]), n)
        self.prefix: list[int] = list(first[:max(0, n)])
        self.suffixes: list[list[int]] = [list(x[len(self.prefix):]) for x in ids]
        self.batches = budget_batches([len(s) for s in self.suffixes], batch_size)
        pad = chat.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def __len__(self) -> int:
        return len(self.suffixes)

    @torch.inference_mode()
    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys/values of the prefix under whatever hooks are active now (None if there is no prefix)."""
        if not self.prefix:
            return None
        cache = DynamicCache(config=self.adapter.model.config)
        ids = torch.tensor([self.prefix], dtype=torch.long, device=self.adapter.device)
        self.adapter.base(input_ids=ids, cache=cache, use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def inputs(self, idx: Sequence[int], kv) -> dict:
        """Model inputs for rows ``idx``: suffix ids left-padded after the prefix, mask over both, cache."""
        device, p = self.adapter.device, len(self.prefix)
        width = max(len(self.suffixes[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), p + width), dtype=torch.long)
        mask[:, :p] = 1
        for r, i in enumerate(idx):
            s = self.suffixes[i]
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, p + width - len(s):] = 1
        position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)[:, p:]
        out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}
        if kv is not None:
            out["cache"] = expand_cache(self.adapter, kv, len(idx))
        return out


def expand_cache(adapter: ModelAdapter, kv, batch: int) -> DynamicCache:
    """A fresh cache holding the prefix keys/values for ``batch`` rows (views, no copies)."""
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(ddp_cache_data=data, config=adapter.model.config)


@contextmanager
def blocks_from(adapter: ModelAdapter, start_layer: int):
    """Run only blocks ``start_layer..`` (the caller feeds block ``start_layer``'s input as inputs_embeds)."""
    base, full = adapter.base, adapter.base.layers
    base.layers = nn.ModuleList(list(full)[start_layer:])
    try:
        yield
    finally:
        base.layers = full


HEAD_ROWS = 256  # rows per LM-head matmul (and float64 log-softmax) when the head runs apart from the batches


def head_apart(adapter: ModelAdapter, plan: PrefixPlan) -> bool:
    """Whether the LM head may run once over a whole pass instead of once per batch (checked once per model).

    A batch of 32 rows streams the whole head weight (545 MB in float32 for a 152k vocabulary) for 32
    matmul rows; running it once per pass took a bf16 search trial of the embedded model from 12.98 s to
    11.59 s (bench/trial_cost.py, docs/search.md). Apart, the batches keep
    each row's last hidden state and one matmul maps them all. Allowed only if the decoder's last hidden
    state through the output embedding gives the model's own logits on a few rows (a model whose forward
    rescales or caps its logits keeps the per-batch head).
    """
    model = adapter.model
    verdict = getattr(model, "_refusal_atlas_head_apart", None)
    if verdict is None:
        verdict, idx = False, list(range(min(4, len(plan))))
        try:
            with torch.inference_mode():
                kv = plan.prefix_kv()  # each inputs() call wraps it in a fresh cache, so both passes share it
                full = model(**plan.inputs(idx, kv), logits_to_keep=1).logits[:, -1].float()
                h = model.get_decoder()(**plan.inputs(idx, kv)).last_hidden_state[:, -1]
                split = model.get_output_embeddings()(h).float()
            verdict = full.shape == split.shape and bool(torch.allclose(full, split, rtol=1e-2, atol=1e-2))
        except Exception:  # no decoder / output-embedding split this simple
            verdict = False
        model._refusal_atlas_head_apart = verdict
    return verdict


def last_position(adapter: ModelAdapter, inputs: dict, apart: bool) -> torch.Tensor:
    """Each row's last hidden state (``apart``) or its next-token logits, from one batch's forward pass."""
    if apart:
        return adapter.model.get_decoder()(**inputs).last_hidden_state[:, -1]
    return adapter.model(**inputs, logits_to_keep=1).logits[:, -1]


def keep_last(last: torch.Tensor | None, n: int, idx, h: torch.Tensor, apart: bool) -> torch.Tensor:
    """Put one batch's :func:`last_position` rows ``h`` at rows ``idx`` of a pass's [n, ·] buffer, made on first
    use: on the model's device for hidden states (``apart``), on the CPU for logits."""
    if last is None:
        last = torch.empty(n, h.shape[-1], dtype=h.dtype, device=h.device if apart else "cpu")
    last[idx] = h
    return last


def last_logprobs(adapter: ModelAdapter, last: torch.Tensor, apart: bool) -> torch.Tensor:
    """:func:`last_position` rows of a whole pass → next-token log-probs [N, V] float32 on the CPU.

    Callers keep hidden states on the model's device and logits (the per-batch head) on the CPU, so a
    large pass never holds [N, V] logits in accelerator memory."""
    head = adapter.model.get_output_embeddings()
    out = torch.empty(len(last), 0)
    for i in range(0, len(last), HEAD_ROWS):  # chunks bound the float64 log-softmax's memory
        with torch.inference_mode():
            logits = head(last[i:i + HEAD_ROWS]) if apart else last[i:i + HEAD_ROWS]
        logp = torch.log_softmax(logits.to(torch.float64), dim=-1).to(torch.float32).cpu()
        if not out.numel():
            out = torch.empty(len(last), logp.shape[-1], dtype=torch.float32)
        out[i:i + HEAD_ROWS] = logp
    return out


@torch.inference_mode()
def plan_logprobs(
    plan: PrefixPlan,
    intervention=None,
    *,
    capture: Sequence[int] = (),
    start_layer: int | None = None,
    start_hidden: dict[int, torch.Tensor] | None = None,
    on_batch=None,
) -> tuple[torch.Tensor, dict[int, dict[int, torch.Tensor]]]:
    """Next-token log-probs [N, V] (float32) at each prompt's last position, in prompt order.

    ``capture``: block-input layers whose hidden states are kept per batch (returned as
    {batch number: {layer: [B, S, d]}}), to be fed back later as ``start_hidden`` with
    ``start_layer`` so that blocks below it are not recomputed.
    """
    adapter = plan.adapter
    captured: dict[int, dict[int, torch.Tensor]] = {}
    current: dict[int, torch.Tensor] = {}

    def grab(layer):
        def fn(hidden: torch.Tensor) -> None:
            current[layer] = hidden.detach().clone()
        return fn

    apart = head_apart(adapter, plan)
    last: torch.Tensor | None = None
    with Hooks() as hooks:
        for l in capture:
            hooks.inputs(adapter.layers[l], grab(l))
        with intervention.apply(adapter) if intervention is not None else nullcontext():
            kv = plan.prefix_kv()
            for b, idx in enumerate(plan.batches):
                inputs = plan.inputs(idx, kv)
                inputs["use_cache"] = kv is not None
                if start_layer is not None:
                    assert start_hidden is not None
                    inputs.pop("input_ids")
                    with blocks_from(adapter, start_layer):
                        h = last_position(adapter, {"inputs_embeds": start_hidden[b], **inputs}, apart)
                else:
                    h = last_position(adapter, inputs, apart)
                if capture:
                    captured[b] = dict(current)
                last = keep_last(last, len(plan), idx, h, apart)
                if on_batch is not None:
                    on_batch(len(idx))
            assert last is not None
            out = last_logprobs(adapter, last, apart)  # inside the intervention: a head edit would apply
    return out, captured
