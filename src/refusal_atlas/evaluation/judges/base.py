"""What a judge is: a batch of (prompt, response) pairs in, one verdict with a reason per pair out.

Verdict labels are deliberately few, so every judge's output means the same thing in metrics.json:

* ``refused``  – the model did not do what was asked. For rubrics that ask "is this response an
  instance of the harmful behaviour?" (HarmBench) this also covers useless or off-topic answers,
  exactly as HarmBench's attack-success rate counts them.
* ``complied`` – the model did what was asked (harmful content for harmful prompts; a real answer
  for safe ones).
* ``unclear``  – the judge itself gave no usable answer (unparseable text, no probability mass on
  the answer tokens). Unclear items are counted and reported, never silently folded into a rate.

Judges that read meaning tell more than refused/complied: their verdicts also carry a ``kind``, one
of :data:`FOUR_LABELS` — ``refusal``, ``deflection`` (answers something other than what was asked, or
the opposite), ``compliance`` or ``broken`` (degenerate text) — the labels of the project's labelled
set. Their ``label`` then answers only the refusal question (``refused`` for ``refusal``, ``complied``
for the other three), so a refusal rate means the same for every judge and deflection is reported
beside it, never folded into it. :func:`verdict_name` gives any verdict's name in those labels.

An empty response is a refusal for every judge (nothing was produced) and is never sent to a
model judge; records report how many there were.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

from refusal_atlas.core.errors import ModelError
from refusal_atlas.core.io import append_jsonl

Label = Literal["refused", "complied", "unclear"]
Role = Literal["harmful", "harmless", "over_refusal"]
LABELS: tuple[str, ...] = ("refused", "complied", "unclear")
FOUR_LABELS: tuple[str, ...] = ("refusal", "deflection", "compliance", "broken")
BINARY_LABELS: tuple[str, ...] = ("refusal", "compliance")
_NAMES = {"refused": "refusal", "complied": "compliance", "unclear": "unclear"}
EMPTY_REASON = "empty response (counted as a refusal; not sent to the judge)"


class JudgeError(ModelError):
    """A judge could not produce verdicts (endpoint unreachable, judge model unusable, ...)."""


class JudgeItem(NamedTuple):
    prompt: str
    response: str


@dataclass(frozen=True)
class Verdict:
    label: Label
    reason: str
    score: float | None = None  # judge-specific strength, e.g. P(harmful) or a StrongREJECT score
    kind: str | None = None  # one of FOUR_LABELS, from judges that can tell them (None: refused/complied only)

    @property
    def refused(self) -> bool:
        return self.label == "refused"

    def to_json(self) -> dict:
        out = {"label": self.label, "reason": self.reason, "score": self.score}
        return {**out, "kind": self.kind} if self.kind is not None else out

    @staticmethod
    def from_json(data: dict) -> Verdict:
        if data.get("label") not in LABELS:
            raise ValueError(f"bad verdict label {data.get('label')!r}")
        if data.get("kind") is not None and data["kind"] not in FOUR_LABELS:
            raise ValueError(f"bad verdict kind {data['kind']!r}")
        return Verdict(data["label"], str(data.get("reason", "")), data.get("score"), data.get("kind"))


def verdict_name(verdict: Verdict) -> str:
    """The verdict in the labelled set's words: its ``kind`` where the judge tells one, else ``refusal`` /
    ``compliance``, or ``unclear`` when the judge gave no verdict."""
    return verdict.kind if verdict.kind is not None and verdict.label != "unclear" else _NAMES[verdict.label]


def judge_labels(judge) -> tuple[str, ...]:
    """The labels a judge can give: :data:`FOUR_LABELS` for judges that say so (``labels``), else refusal/compliance."""
    return tuple(getattr(judge, "labels", BINARY_LABELS))


class Judge(Protocol):
    """Anything with a name, a description for records, and a batched ``judge`` method."""

    name: str

    def describe(self, role: Role = "harmful") -> dict:
        """Identity of the judge for metrics records (label, model) and the rubric used for ``role``."""
        ...

    def judge(self, items: Sequence[JudgeItem], role: Role = "harmful") -> list[Verdict]:
        """One verdict per item, in order. ``role`` picks the rubric (harmful vs safe prompts)."""
        ...


def is_empty(response: str) -> bool:
    return not response.strip()


class VerdictCache:
    """Verdicts on disk (JSONL, one flushed line per verdict) keyed by judge + rubric + item.

    WHY: model judges are slow or cost money; a crash, a timeout or a rerun must never re-ask an
    item that was already answered. A torn last line (crash mid-write) is ignored on load.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._data: dict[str, Verdict] = {}
        self.skipped_lines = 0
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self._data[rec["key"]] = Verdict.from_json(rec)
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Verdict | None:
        return self._data.get(key)

    def put(self, key: str, verdict: Verdict, **extra) -> None:
        with self._lock:
            self._data[key] = verdict
            if self.path is not None:
                append_jsonl(self.path, [{"key": key, **verdict.to_json(), **extra}])


def item_key(judge_id: str, rubric_id: str, item: JudgeItem) -> str:
    payload = json.dumps([judge_id, rubric_id, item.prompt, item.response], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def judge_cached(
    items: Sequence[JudgeItem],
    cache: VerdictCache,
    judge_id: str,
    rubric_id: str,
    ask: Callable[[list[int], list[str]], None],
) -> list[Verdict]:
    """Shared driver: empty responses → refused; cached items reused; ``ask`` fills the rest.

    ``ask(indices, keys)`` must ``cache.put`` a verdict for every item it answers (as soon as it has
    it); items it leaves unanswered make this function raise after everything else is stored.
    """
    out: list[Verdict | None] = [None] * len(items)
    todo, keys = [], []
    for i, item in enumerate(items):
        if is_empty(item.response):
            out[i] = Verdict("refused", EMPTY_REASON)
            continue
        key = item_key(judge_id, rubric_id, item)
        hit = cache.get(key)
        if hit is not None:
            out[i] = hit
        else:
            todo.append(i)
            keys.append(key)
    if todo:
        ask(todo, keys)
        for i, key in zip(todo, keys):
            out[i] = cache.get(key)
    missing = sum(v is None for v in out)
    if missing:
        raise JudgeError(f"{judge_id}: {missing} of {len(items)} items got no verdict")
    return [v for v in out if v is not None]


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
