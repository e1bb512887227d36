"""Capability as a third search objective: a multiple-choice task scored per trial under the edit.

First-token KL on harmless prompts measures how much an edit moves the next-token distribution, not whether
the model still knows things; heretic 2.0 users found it a poor proxy for lost capability and made benchmark
tasks search objectives. ``search edits --objective refusal,kl,TASK`` adds one:

* **TASK = ``basics``** (:data:`OFFLINE`, shipped in ``refusal_atlas/data/tasks``; no download): a seeded
  sample of ``search.task_n`` items from the task's *validation* part (its *test* part is never scored by a
  search, so it stays held out for reporting). Each item is scored as lm-eval scores multiple-choice tasks such
  as PIQA or ARC: the chat-formatted question, then each choice's text as the assistant's answer; the summed
  log-likelihood of each choice's tokens, renormalised over the item's choices, gives the negative
  log-likelihood (NLL) of the correct choice, and the most likely choice is the model's answer. (A first
  version read the next-token probabilities of lettered choices instead, one pass per item: the embedded 0.5B
  model answered at chance that way, 0.28 on 64 validation items, because it does not follow the letter
  format, while it picks the right choice text for about half of them; a task at chance cannot show lost
  capability.)
* **any other TASK**: an lm-eval task (``refusal_atlas.evaluation.benchmarks``; built-in ones download their
  data), the first ``search.task_n`` documents through ``run_benchmarks(..., limit=n)``; its NLL is minus
  lm-eval's mean log-likelihood of the gold choice.

**The objective** (minimised, like refusal and KL) is the *increase* of the mean NLL of the correct choice over
the unedited model on the same items: 0 for no edit, smooth where accuracy moves in 1/n steps, and below 0 when an
edit happens to help. Accuracy is recorded beside it (trial attribute ``capability``), never optimised.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Any

import torch

from refusal_atlas.core.errors import ConfigError, DataError

CORE = ("refusal", "kl")  # the objectives every edit search has, in this order
OFFLINE = {"basics": "basics.jsonl"}  # offline task name → file under refusal_atlas/data/tasks
MAX_CHOICES = 6


def parse_objectives(names: Sequence[str]) -> tuple[str, ...]:
    """``--objective`` names → the study's objectives ``(refusal, kl)`` or ``(refusal, kl, TASK)``.

    Cheap and before any model loads: refusal and KL must both be there, no name twice, at most one task, and
    the task must exist (the offline one, or an lm-eval task known to lm-eval's registry)."""
    names = [n.strip() for n in names if n.strip()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--objective names {', '.join(twice)} twice; give each objective once "
                          "(e.g. refusal,kl,basics)")
    missing = [c for c in CORE if c not in names]
    if missing:
        raise ConfigError(f"--objective must include {' and '.join(missing)} (refusal and kl are always searched; "
                          f"add one task: refusal,kl,basics), got {','.join(names) or 'nothing'}")
    tasks = [n for n in names if n not in CORE]
    if len(tasks) > 1:
        raise ConfigError(f"--objective takes at most one task besides refusal and kl, got {', '.join(tasks)}")
    if tasks:
        check_task(tasks[0])
    return (*CORE, *tasks)


def check_task(name: str) -> str:
    """``name`` if it is the offline task or a known lm-eval task, else a ConfigError naming the choices."""
    if name in OFFLINE:
        return name
    from refusal_atlas.evaluation.benchmarks import check_tasks

    try:
        check_tasks([name])
    except ConfigError as exc:
        raise ConfigError(f"unknown objective {name!r}: not an offline task ({', '.join(OFFLINE)}); {exc}") from None
    return name


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


@lru_cache(maxsize=4)
def load_task(name: str) -> dict[str, tuple[ChoiceItem, ...]]:
    """The offline task ``name`` as {split: items}."""
    if name not in OFFLINE:
        raise ConfigError(f"no offline task {name!r}; offline tasks: {', '.join(OFFLINE)}")
    text = (files("refusal_atlas.data") / "tasks" / OFFLINE[name]).read_text(encoding="utf-8")
    out: dict[str, list[ChoiceItem]] = {}
    for i, line in enumerate(text.splitlines()):
        row = json.loads(line)
        item = ChoiceItem(row["id"], row["question"], tuple(row["choices"]), int(row["answer"]))
        if not 2 <= len(item.choices) <= MAX_CHOICES or not 0 <= item.answer < len(item.choices):
            raise DataError(f"task {name!r} line {i + 1}: needs 2..{MAX_CHOICES} choices and a valid answer index")
        out.setdefault(row["split"], []).append(item)
    return {k: tuple(v) for k, v in out.items()}


def sample_items(items: Sequence[ChoiceItem], n: int, seed: int) -> list[ChoiceItem]:
    """``n`` items drawn without replacement by a generator seeded with ``seed`` (all of them if fewer)."""
    if n < 1:
        raise ConfigError(f"search.task_n must be >= 1, got {n}")
    return list(items) if n >= len(items) else random.Random(seed).sample(list(items), n)


class CapabilityTask:
    """What the search asks of a task scorer: :meth:`measure` under the active edit, the unedited
    :meth:`baseline` (cached) and the trial's :meth:`score`."""

    name: str
    _base: dict[str, Any] | None = None

    def fingerprint(self) -> str:
        raise NotImplementedError

    def measure(self) -> dict[str, Any]:
        """{"nll": mean NLL of the correct choice, "accuracy", "n"} as the model is now."""
        raise NotImplementedError

    def baseline(self) -> dict[str, Any]:
        """The unedited model's numbers (call outside any edit), computed once."""
        if self._base is None:
            self._base = self.measure()
        return self._base

    def score(self) -> dict[str, Any]:
        """Under the active edit: ``loss`` (mean NLL minus the unedited model's: the objective), ``nll``, ``accuracy``, ``n``."""
        base = self._base if self._base is not None else self.baseline()
        now = self.measure()
        return {"loss": now["nll"] - base["nll"], **now}


class ChoiceTask(CapabilityTask):
    """An offline multiple-choice sample scored by the likelihood of each choice's text after the question,
    under whatever edit is active: one forward pass per (item, choice) sequence, batched.

    The token ids are built once: the chat-formatted question (the same rendering as every other prompt of the
    run) followed by the choice's own tokens, so every call scores exactly the same sequences."""

    def __init__(self, adapter, chat, items: Sequence[ChoiceItem], *, name: str, batch_size: int = 16):
        if not items:
            raise ConfigError("the capability task has no items")
        self.adapter, self.chat, self.items, self.name, self.batch_size = adapter, chat, list(items), name, batch_size
        tok = chat.tokenizer
        self.seqs: list[tuple[int, int, list[int], int]] = []  # (item, choice, ids, number of choice tokens)
        for i, it in enumerate(self.items):
            prompt = tok(chat.render(it.question), add_special_tokens=False)["input_ids"]
            for j, choice in enumerate(it.choices):
                ids = tok(choice, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ConfigError(f"task item {it.id!r}: choice {choice!r} encodes to no tokens")
                self.seqs.append((i, j, [*prompt, *ids], len(ids)))
        self.order = sorted(range(len(self.seqs)), key=lambda k: len(self.seqs[k][2]))  # less padding per batch
        self.answers = torch.tensor([it.answer for it in self.items])
        self.width = max(len(it.choices) for it in self.items)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def fingerprint(self) -> str:
        text = json.dumps([self.name, "choice-text", [it.id for it in self.items], [s[2] for s in self.seqs]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @torch.no_grad()
    def _choice_logliks(self) -> torch.Tensor:
        """[items, max choices]: summed log-likelihood of each choice's tokens (−inf past an item's last choice)."""
        model, device = self.adapter.model, self.adapter.device
        out = torch.full((len(self.items), self.width), float("-inf"), dtype=torch.float64)
        step = max(1, self.batch_size)
        for start in range(0, len(self.order), step):
            batch = [self.seqs[k] for k in self.order[start:start + step]]
            length = max(len(ids) for _, _, ids, _ in batch)
            ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for r, (_, _, seq, _) in enumerate(batch):  # right padding: real tokens keep positions 0..n-1
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, (i, j, seq, n) in enumerate(batch):
                logp = torch.log_softmax(logits[r, len(seq) - n - 1:len(seq) - 1].double(), dim=-1)
                target = torch.tensor(seq[len(seq) - n:], device=logp.device)
                out[i, j] = float(logp.gather(1, target[:, None]).sum())
        return out

    def measure(self) -> dict[str, Any]:
        """Mean NLL of the correct choice (renormalised over the item's choices) and accuracy, as the model is now."""
        logp = torch.log_softmax(self._choice_logliks(), dim=-1)
        nll = -logp.gather(1, self.answers[:, None]).squeeze(1)
        right = (logp.argmax(dim=-1) == self.answers).double()
        return {"nll": float(nll.mean()), "accuracy": float(right.mean()), "n": len(self.items)}


class LmEvalTask(CapabilityTask):
    """An lm-eval task's first ``limit`` documents, scored by lm-eval under the active edit (its gold-choice
    log-likelihood; see :func:`refusal_atlas.evaluation.benchmarks.run_benchmarks`)."""

    def __init__(self, adapter, chat, name: str, *, limit: int, batch_size: int = 8):
        if limit < 1:
            raise ConfigError(f"search.task_n must be >= 1, got {limit}")
        self.adapter, self.chat, self.name, self.limit, self.batch_size = adapter, chat, name, limit, batch_size

    def fingerprint(self) -> str:
        return f"lm-eval:{self.name}:{self.limit}"

    def measure(self) -> dict[str, Any]:
        from refusal_atlas.evaluation.benchmarks import run_benchmarks

        recs = run_benchmarks(self.adapter.model, self.chat.tokenizer, [self.name], limit=self.limit,
                              batch_size=self.batch_size)
        gold = [r for r in recs if r.get("gold_loglik_mean") is not None]
        if not gold:
            raise ConfigError(f"lm-eval task {self.name!r} is not multiple-choice (no gold-choice log-likelihood); "
                              "a capability objective needs one")
        nll = sum(-r["gold_loglik_mean"] * r["n"] for r in gold) / sum(r["n"] for r in gold)
        acc = sum(r["rate"] * r["n"] for r in gold) / sum(r["n"] for r in gold)
        return {"nll": nll, "accuracy": acc, "n": sum(r["n"] for r in gold)}


def capability_task(name: str, adapter, chat, *, n: int, seed: int, batch_size: int = 16) -> CapabilityTask:
    """The scorer of objective ``name``: the offline task's seeded validation sample, or an lm-eval task."""
    if name in OFFLINE:
        items = load_task(name)["validation"]
        return ChoiceTask(adapter, chat, sample_items(items, n, seed), name=name, batch_size=batch_size)
    return LmEvalTask(adapter, chat, name, limit=n, batch_size=batch_size)  # parse_objectives checked the name
