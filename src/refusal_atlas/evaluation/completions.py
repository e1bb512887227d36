"""Completions on disk: generate once, judge many times.

A completions file (``R/completions/<dataset>__<intervention>.jsonl``) holds one line per (prompt,
generation length) with the response text, its token ids and what produced it: ``max_new_tokens``
and a fingerprint of the intervention (kind, mode, layer, coeff and the direction values). A later
evaluation reuses a line only when both match, and generates only the prompts that are missing, so
adding a judge or a dataset never regenerates text; changing the length or the direction does.
The token ids let damage metrics teacher-force on exactly the clean model's continuation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_atlas.data import Prompt
from refusal_atlas.evaluation.damage import greedy_continuations
from refusal_atlas.evaluation.refusal import is_refusal
from refusal_atlas.interventions import Intervention, as_matrix
from refusal_atlas.io import write_text
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter


@dataclass
class Completions:
    responses: list[str]
    token_ids: list[list[int]]
    reused: int  # how many came from the file instead of being generated


def intervention_fingerprint(intervention: Intervention) -> str:
    """Short hash of everything that changes generations under ``intervention``."""
    h = hashlib.sha256(json.dumps(intervention.describe(), sort_keys=True, default=str).encode())
    if intervention.kind != "none":
        h.update(as_matrix(intervention.directions).detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _read(path: Path | None) -> list[dict]:
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


def _usable(rec: dict, max_new_tokens: int, fingerprint: str) -> bool:
    return (rec.get("max_new_tokens") == max_new_tokens and rec.get("fingerprint") == fingerprint
            and isinstance(rec.get("response"), str) and isinstance(rec.get("token_ids"), list))


def completions_for(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    prompts: Sequence[Prompt],
    intervention: Intervention,
    max_new_tokens: int,
    batch_size: int,
    path: Path | None,
    desc: str = "generate",
    backend=None,
) -> Completions:
    """Greedy completions for ``prompts`` under ``intervention``, reusing matching lines in ``path``.

    ``backend``: another generation engine with ``greedy_continuations``'s signature (e.g.
    :class:`refusal_atlas.generation_vllm.VllmBackend`); None generates with HF and the hooks.
    """
    fp = intervention_fingerprint(intervention)
    lines = _read(path)
    have = {r["instruction"]: r for r in lines if _usable(r, max_new_tokens, fp)}
    missing = list(dict.fromkeys(p.instruction for p in prompts if p.instruction not in have))
    if missing:
        generate = greedy_continuations if backend is None else backend.continuations
        ids = generate(adapter, chat, missing, max_new_tokens, batch_size, intervention, desc=desc)
        category = {p.instruction: p.category for p in prompts}
        for text, toks in zip(missing, ids):
            response = chat.tokenizer.decode(toks, skip_special_tokens=True).strip()
            have[text] = {"instruction": text, "category": category[text], "response": response,
                          "refusal": is_refusal(response), "intervention": intervention.label,
                          "max_new_tokens": max_new_tokens, "fingerprint": fp, "token_ids": toks}
        if path is not None:
            replaced = {(t, max_new_tokens, fp) for t in missing}
            kept = [r for r in lines if (r["instruction"], r.get("max_new_tokens"), r.get("fingerprint")) not in replaced]
            body = kept + [have[t] for t in missing]
            write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in body))
    recs = [have[p.instruction] for p in prompts]
    fresh = set(missing)
    reused = sum(1 for p in prompts if p.instruction not in fresh)
    return Completions([r["response"] for r in recs], [list(r["token_ids"]) for r in recs], reused)
