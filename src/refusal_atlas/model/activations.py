"""Residual-stream representations at chosen layers × post-instruction positions.

Means are accumulated in float64 while streaming batches, so memory does not grow with the
number of prompts. Per-prompt vectors are kept only at the last position (what SOM training and
geometry plots need). The forward pass stops right after the deepest requested layer and never
runs the LM head. Where the model allows it (:func:`~refusal_atlas.model.prefix_cache.supports_prefix_reuse`)
the chat template's common opening is run once and each batch runs only the prompts' own tokens on its
keys/values: the same residuals up to float rounding (tested), about half the work on short prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_atlas.core.batching import length_sorted_batches
from refusal_atlas.core.crashpoints import crash_point
from refusal_atlas.core.errors import ArtifactError
from refusal_atlas.core.io import load_tensors, save_tensors
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.hooks import Hooks
from refusal_atlas.model.prefix_cache import PrefixPlan, supports_prefix_reuse
from refusal_atlas.core.progress import progress


@dataclass
class ActivationSet:
    """Representations of one prompt set.

    ``mean``: [n_positions, n_layers, d] float64; ``last``: [n_prompts, n_layers, d] float32 at
    position -1 (or None); ``layers`` are block-input indices, ``positions`` negative offsets.
    """

    layers: list[int]
    positions: list[int]
    mean: torch.Tensor
    n: int
    last: torch.Tensor | None = None

    def mean_at(self, layer: int, position: int = -1) -> torch.Tensor:
        return self.mean[self.positions.index(position), self.layers.index(layer)]

    def last_at(self, layer: int) -> torch.Tensor:
        if self.last is None:
            raise ArtifactError("per-prompt representations were not kept for this activation set")
        return self.last[:, self.layers.index(layer)]


@dataclass
class Activations:
    """Residual representations of a harmful and a harmless prompt set, with the prompts they came from.

    What the contrastive estimators fit on (``DIM().fit(acts)``, ``SOM(layer=...).fit(acts)``), and
    what ``Atlas.extract`` returns.
    """

    harmful: ActivationSet
    harmless: ActivationSet
    harmful_prompts: list[str]
    harmless_prompts: list[str]

    @property
    def layers(self) -> list[int]:
        return list(self.harmful.layers)


class _Stop(Exception):
    pass


@torch.inference_mode()
def extract(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    instructions: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    keep_last: bool = True,
    desc: str = "extract",
) -> ActivationSet:
    """Run the prompts and collect block-input residuals (our layer convention)."""
    layers = sorted(adapter.check_layer(l) for l in (layers if layers is not None else range(adapter.n_layers)))
    positions = chat.positions(positions)
    if not instructions:
        raise ArtifactError("no prompts to extract representations from")
    if keep_last and -1 not in positions:
        raise ArtifactError("keep_last needs position -1 among the extracted positions")
    d = adapter.d_model
    total = torch.zeros(len(positions), len(layers), d, dtype=torch.float64)
    last = torch.zeros(len(instructions), len(layers), d, dtype=torch.float32) if keep_last else None
    pos_index = torch.tensor(positions)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def fn(hidden: torch.Tensor) -> None:
            captured[layer] = hidden[:, pos_index.to(hidden.device)].detach().to("cpu", torch.float64)
            if layer == layers[-1]:
                raise _Stop

        return fn

    plan = _prefix_plan(adapter, chat, instructions, batch_size)
    kv = plan.prefix_kv() if plan is not None else None  # before the hooks: they must see only prompt tokens
    bar = progress(len(instructions), desc)
    try:
        with Hooks() as hooks:
            for l in layers:
                hooks.inputs(adapter.layers[l], capture(l))
            for idx in (plan.batches if plan is not None else
                        length_sorted_batches(chat.token_lengths(instructions), batch_size)):
                batch = (plan.inputs(idx, kv) if plan is not None else
                         chat.encode([instructions[i] for i in idx], device=adapter.device))
                try:
                    adapter.base(**batch, use_cache=plan is not None)
                except _Stop:
                    pass
                stacked = torch.stack([captured[l] for l in layers], dim=2)  # [b, P, L, d]
                total += stacked.sum(dim=0)
                if last is not None:
                    last[idx] = stacked[:, positions.index(-1)].to(torch.float32)
                bar.update(len(idx))
    finally:
        bar.close()
    return ActivationSet(layers=list(layers), positions=list(positions), mean=total / len(instructions),
                         n=len(instructions), last=last)


def _prefix_plan(adapter: ModelAdapter, chat: ChatFormatter, instructions: Sequence[str],
                 batch_size: int) -> PrefixPlan | None:
    """A shared-prefix plan when the model allows one and every prompt's own tokens end with the whole
    post-instruction template (so each position this module reads is in them); else None (plain passes)."""
    if not supports_prefix_reuse(adapter):
        return None
    plan = PrefixPlan(adapter, chat, instructions, batch_size)
    eoi = list(chat.eoi_ids)
    if not plan.prefix or any(len(s) <= len(eoi) or s[-len(eoi):] != eoi for s in plan.suffixes):
        return None
    return plan


def extract_resumable(adapter: ModelAdapter, chat: ChatFormatter, instructions: Sequence[str], partial: Path,
                      **kwargs) -> ActivationSet:
    """:func:`extract`, saved to ``partial`` as soon as it is done and reused from there when the same
    prompts, model config, layers, positions and batching are asked again (a rerun after a crash)."""
    key = hashlib.sha256(json.dumps([[chat.render(t) for t in instructions], adapter.model.config.to_json_string(),
                                     {k: v for k, v in kwargs.items() if k != "desc"}], default=str).encode())
    key = key.hexdigest()[:16]
    if partial.is_file():
        try:
            tensors, meta = load_tensors(partial)
            if meta.get("key") == key:
                return ActivationSet(meta["layers"], meta["positions"], tensors["mean"], meta["n"], tensors.get("last"))
        except (ArtifactError, KeyError):
            pass  # unreadable or foreign: extract again
    acts = extract(adapter, chat, instructions, **kwargs)
    save_tensors(partial, {"mean": acts.mean, **({"last": acts.last} if acts.last is not None else {})},
                 {"key": key, "layers": acts.layers, "positions": acts.positions, "n": acts.n})
    crash_point("extract")
    return acts


def save_activation_sets(path: str | os.PathLike, sets: dict[str, ActivationSet]) -> Path:
    """Save named activation sets (e.g. harmful / harmless) to one safetensors file."""
    tensors, meta = {}, {}
    for name, s in sets.items():
        tensors[f"{name}.mean"] = s.mean
        if s.last is not None:
            tensors[f"{name}.last"] = s.last
        meta[name] = {"layers": s.layers, "positions": s.positions, "n": s.n}
    return save_tensors(path, tensors, meta)


def load_activation_sets(path: str | os.PathLike) -> dict[str, ActivationSet]:
    tensors, meta = load_tensors(path)
    try:
        return {
            name: ActivationSet(layers=m["layers"], positions=m["positions"], n=m["n"],
                                mean=tensors[f"{name}.mean"], last=tensors.get(f"{name}.last"))
            for name, m in meta.items()
        }
    except KeyError as exc:
        raise ArtifactError(f"activation file {path} is incomplete (missing {exc})") from None
