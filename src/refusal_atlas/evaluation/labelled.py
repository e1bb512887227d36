"""Rows of (prompt, response) to judge outside a run: any completions file, and the labelled set.

A row is one JSON object per line. It needs ``response`` (a string) and the prompt as ``instruction``
(this project's completions files, the labelled set) or ``prompt`` (an alias, for files other tools
write); every other field is kept as it is. ``role`` (harmful / harmless / over_refusal) picks the
rubric of rubric judges; rows without one take the caller's default. The labelled set adds ``label``
(refusal / deflection / compliance / broken), ``prompt_id`` and ``condition`` (which edit made the
response).

Input is read strictly — a line that is not a JSON object, a row without a response, an unknown role
or label is an error naming the line — because a judge that silently skipped rows would report a rate
over rows nobody chose.

**The split.** The meaning judge trains on part of the labelled set and is measured on the rest. A row
is in the training part when ``int(sha256(prompt_id), 16) % 10 < 6`` (about 60 %), so every row of one
prompt (the same prompt under several edit strengths) is on one side; cross-validation folds inside the
training part use ``sha256("fold:" + prompt_id)`` the same way. Rows without ``prompt_id`` use the
labelled set's own id, the first 12 hex digits of sha256 of the prompt text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from refusal_atlas.core.errors import DataError
from refusal_atlas.evaluation.judges.base import FOUR_LABELS

ROLES: tuple[str, ...] = ("harmful", "harmless", "over_refusal")
PROMPT_FIELDS: tuple[str, ...] = ("instruction", "prompt")
TRAIN_BUCKETS, BUCKETS = 6, 10
SPLIT_RULE = (f"train when int(sha256(prompt_id).hexdigest(), 16) % {BUCKETS} < {TRAIN_BUCKETS}, else held out; "
              "prompt_id defaults to sha256(instruction).hexdigest()[:12]")
FOLD_RULE = 'fold = int(sha256("fold:" + prompt_id).hexdigest(), 16) % folds'


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in the file
    data: dict  # the row as read, unchanged
    prompt: str
    response: str
    role: str
    prompt_id: str
    label: str | None = None


def _hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def default_prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def part_of(prompt_id: str) -> str:
    """``train`` or ``heldout`` (see the module docstring)."""
    return "train" if _hash_int(prompt_id) % BUCKETS < TRAIN_BUCKETS else "heldout"


def fold_of(prompt_id: str, folds: int) -> int:
    return _hash_int("fold:" + prompt_id) % folds


def read_rows(path: str | Path, default_role: str = "harmful", need_label: bool = False) -> list[Row]:
    """Every row of a JSONL file, checked; DataError naming the file and line for the first bad one."""
    path = Path(path)
    if default_role not in ROLES:
        raise DataError(f"unknown role {default_role!r}; choose from {', '.join(ROLES)}")
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected JSON lines") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number}: not a JSON line (expected one JSON object per line)") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}:{number}: not a JSON object")
        rows.append(_row(path, number, data, default_role, need_label))
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def _row(path: Path, number: int, data: dict, default_role: str, need_label: bool) -> Row:
    where = f"{path}:{number}"
    if not isinstance(data.get("response"), str):
        raise DataError(f"{where}: no `response` field (a string)")
    field = next((f for f in PROMPT_FIELDS if isinstance(data.get(f), str)), None)
    if field is None:
        raise DataError(f"{where}: no `instruction` (or `prompt`) field (a string)")
    role = data.get("role", default_role)
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    label = data.get("label")
    if need_label and label not in FOUR_LABELS:
        raise DataError(f"{where}: unknown label {label!r}; labels are {', '.join(FOUR_LABELS)}")
    prompt_id = data.get("prompt_id")
    prompt_id = prompt_id if isinstance(prompt_id, str) and prompt_id else default_prompt_id(data[field])
    return Row(number, data, data[field], data["response"], role, prompt_id, label if need_label else None)
