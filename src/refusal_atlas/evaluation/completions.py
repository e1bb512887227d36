"""Completions on disk: generate once, judge many times.

A completions file (``R/completions/<dataset>__<intervention>.jsonl``) holds one line per (prompt,
generation length) with the response text, its token ids and what produced it: ``max_new_tokens``
and a fingerprint of the intervention (kind, mode, layer, coeff and the direction values). A later
evaluation reuses a line only when both match, and generates only the prompts that are missing, so
adding a judge or a dataset never regenerates text; changing the length or the direction does.
The token ids let damage metrics teacher-force on exactly the clean model's continuation. The file
is rewritten (atomically) after every generated batch, so a killed evaluation loses one batch at most.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_atlas.core.batching import length_sorted_batches
from refusal_atlas.core.crashpoints import crash_point
from refusal_atlas.data import Prompt
from refusal_atlas.evaluation.refusal import REFUSAL_SUBSTRINGS, is_refusal, refusal_phrase_in
from refusal_atlas.model.generation import DECODING, Generated, greedy_generate, stop_token_ids
from refusal_atlas.edits.base import Edit
from refusal_atlas.edits.projection import as_matrix
from refusal_atlas.core.io import write_text
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.prefix_cache import supports_prefix_reuse


@dataclass
class Completions:
    responses: list[str]
    token_ids: list[list[int]]
    reused: int  # how many came from the file instead of being generated
    first_logprobs: torch.Tensor | None = None  # [N, V] when asked for and every row was generated now


def intervention_fingerprint(intervention: Edit) -> str:
    """Short hash of everything that changes generations under ``intervention``."""
    h = hashlib.sha256(json.dumps(intervention.describe(), sort_keys=True, default=str).encode())
    if intervention.kind != "none":
        h.update(as_matrix(intervention.directions).detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def read_completions(path: Path | None) -> list[dict]:
    """The well-formed records of a completions JSONL file (a torn last line from a crash is skipped)."""
    if path is None or not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("instruction"), str):
            out.append(rec)
    return out


def _usable(rec: dict, max_new_tokens: int, fingerprint: str, allow_decided: bool = False) -> bool:
    """A saved line fits when length and intervention match; a line cut short once its substring verdict
    was decided (``stop == "decided"``) only fits callers that judge by substring alone."""
    return (rec.get("max_new_tokens") == max_new_tokens and rec.get("fingerprint") == fingerprint
            and isinstance(rec.get("response"), str) and isinstance(rec.get("token_ids"), list)
            and (allow_decided or rec.get("stop") != "decided"))


def refusal_decided(tokenizer, substrings: Sequence[str] = REFUSAL_SUBSTRINGS) -> Callable[[list[int]], bool]:
    """Stop rule for substring-judged generations: once a refusal phrase is in the text, more tokens
    cannot change the verdict (the phrase stays a substring of any longer decoding)."""
    return lambda ids: refusal_phrase_in(tokenizer.decode(ids, skip_special_tokens=True), substrings)


def completions_for(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    prompts: Sequence[Prompt],
    intervention: Edit,
    max_new_tokens: int,
    batch_size: int,
    path: Path | None,
    desc: str = "generate",
    stop_when_decided: bool = False,
    keep_first_logprobs: bool = False,
    backend=None,
) -> Completions:
    """Greedy completions for ``prompts`` under ``intervention``, reusing matching lines in ``path``.

    ``stop_when_decided``: stop a row once a refusal phrase appears (its substring verdict is then
    fixed); such lines are marked ``stop: "decided"`` and are never reused for full-length callers.
    ``backend``: another generation engine with a ``continuations`` method (e.g.
    :class:`refusal_atlas.export.vllm.VllmBackend`); None generates with HF and the hooks.
    Either way one batch at a time is generated and saved.
    """
    fp = intervention_fingerprint(intervention)
    lines = read_completions(path)
    have = {r["instruction"]: r for r in lines if _usable(r, max_new_tokens, fp, stop_when_decided)}
    missing = list(dict.fromkeys(p.instruction for p in prompts if p.instruction not in have))
    category = {p.instruction: p.category for p in prompts}
    replaced = {(t, max_new_tokens, fp) for t in missing}
    kept = [r for r in lines if (r["instruction"], r.get("max_new_tokens"), r.get("fingerprint")) not in replaced]
    stop = refusal_decided(chat.tokenizer) if stop_when_decided and supports_prefix_reuse(adapter) else None
    first: dict[str, torch.Tensor | None] = {}
    done: list[str] = []
    # one batch at a time, each saved before the next starts: a crash loses at most one batch, and a
    # rerun forms the remaining batches exactly as an uninterrupted run would (same length order)
    eos = set(stop_token_ids(adapter.model, chat.tokenizer)) if backend is not None else set()
    for idx in length_sorted_batches(chat.token_lengths(missing), batch_size) if missing else []:
        texts = [missing[i] for i in idx]
        if backend is None:
            gens = greedy_generate(adapter, chat, texts, max_new_tokens, len(texts), intervention, desc=desc,
                                   stop_when=stop, keep_first_logprobs=keep_first_logprobs)
        else:
            ids = backend.continuations(adapter, chat, texts, max_new_tokens, len(texts), intervention, desc=desc)
            gens = [Generated(list(t), "eos" if t and t[-1] in eos else "max_new_tokens") for t in ids]
        for text, g in zip(texts, gens):
            response = chat.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
            first[text] = g.first_logprobs
            have[text] = {"instruction": text, "category": category[text], "response": response,
                          "refusal": is_refusal(response), "intervention": intervention.label,
                          "max_new_tokens": max_new_tokens, "fingerprint": fp, "token_ids": g.token_ids,
                          "stop": g.stop, "decoding": DECODING["strategy"]}
        done += texts
        if path is not None:
            write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept + [have[t] for t in done]))
        crash_point("generate")
    recs = [have[p.instruction] for p in prompts]
    fresh = set(missing)
    reused = sum(1 for p in prompts if p.instruction not in fresh)
    firsts = [first.get(p.instruction) for p in prompts] if missing and keep_first_logprobs else []
    stacked = torch.stack(firsts) if firsts and all(f is not None for f in firsts) else None
    return Completions([r["response"] for r in recs], [list(r["token_ids"]) for r in recs], reused, stacked)
