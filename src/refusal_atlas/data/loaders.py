"""Load prompts from the shipped registry or from a user file (.json, .jsonl, .csv, .txt).

Every input problem becomes one :class:`DataError` whose message names the file and the
record, so the CLI can print it on a single line. Shipped data is read with
``importlib.resources`` so that it also works from an installed wheel or zip.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from refusal_atlas.data.registry import REGISTRY, registry_hint
from refusal_atlas.core.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt; ``category`` and ``target`` are kept when the source provides them."""

    instruction: str
    category: str | None = None
    target: str | None = None  # e.g. JailbreakBench "Sure, here is ..." targets


def load_prompts(
    name_or_path: str | os.PathLike[str], *, n: int | None = None, seed: int = 0, field: str = "instruction"
) -> list[Prompt]:
    """Load a registered set by name, or else a file; optionally a seeded random sample of ``n``.

    Sampling uses ``random.Random(seed).sample`` so a (set, n, seed) triple always yields the same
    prompts; when ``n`` covers the whole set the file order is kept.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise DataError(f"Sample size n must be a positive integer, got {n!r}.")
    key = os.fspath(name_or_path)
    if key in REGISTRY:
        prompts = list(_load_registered(key, field))
    else:
        prompts = _load_file(Path(key).expanduser(), field)
    if n is None or n >= len(prompts):
        return prompts
    return random.Random(seed).sample(prompts, n)


@lru_cache(maxsize=32)
def _load_registered(name: str, field: str) -> tuple[Prompt, ...]:
    """Parse a shipped set once per process; Prompt is frozen, so sharing the tuple is safe."""
    rel = REGISTRY[name].path
    label = f"Prompt set {name!r} (prompts/{rel})"
    resource = files("refusal_atlas.data") / "prompts"
    for part in rel.split("/"):  # one segment at a time: zip-backed Traversables need that
        resource = resource / part
    try:
        text = resource.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{label} cannot be read ({exc}); the installation may be incomplete.") from None
    return tuple(_finish(_parse_json(text, label, field), label))


def _load_file(path: Path, field: str) -> list[Prompt]:
    if not path.exists():
        raise DataError(f"Unknown prompt set or missing file {str(path)!r}. {registry_hint()}")
    if not path.is_file():
        raise DataError(f"Prompt file {str(path)!r} is not a regular file.")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"Prompt file {str(path)!r} has unsupported extension {path.suffix!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}."
        )
    label = f"Prompt file {str(path)!r}"
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet exports often add.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{label} is not valid UTF-8 ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise DataError(f"{label} cannot be read: {exc.strerror or exc}.") from None
    parse = {".json": _parse_json, ".jsonl": _parse_jsonl, ".csv": _parse_csv, ".txt": _parse_txt}[suffix]
    return _drop_duplicates(_finish(parse(text, label, field), label), label)


def _drop_duplicates(prompts: list[Prompt], label: str) -> list[Prompt]:
    """Keep the first of repeated instructions: a repeat would count twice in every rate."""
    seen: set[str] = set()
    unique = [p for p in prompts if not (p.instruction in seen or seen.add(p.instruction))]
    if len(unique) < len(prompts):
        log.warning("%s: %d duplicate prompt(s) dropped (the first of each kept); %d unique prompts remain",
                    label, len(prompts) - len(unique), len(unique))
    return unique


def _finish(prompts: list[Prompt], label: str) -> list[Prompt]:
    if not prompts:
        raise DataError(f"{label} contains no prompts.")
    return prompts


def _record(rec: Any, label: str, where: str, field: str) -> Prompt:
    """Turn one parsed record (object or bare string) into a Prompt, or explain what is wrong."""
    if isinstance(rec, str):
        value: Any = rec
        category = target = None
    elif isinstance(rec, dict):
        if field not in rec:
            keys = ", ".join(map(str, rec)) or "none"
            raise DataError(f"{label}: {where} has no {field!r} key (keys: {keys}).")
        value, category, target = rec[field], rec.get("category"), rec.get("target")
    else:
        raise DataError(f"{label}: {where} is {type(rec).__name__}, expected an object or a string.")
    if not isinstance(value, str) or not value.strip():
        if isinstance(value, str):
            problem = "is empty"
        else:
            problem = "is null" if value is None else f"is {type(value).__name__}, not a string"
        raise DataError(f"{label}: {where} field {field!r} {problem}.")
    return Prompt(value, _optional(category), _optional(target))


def _optional(value: Any) -> str | None:
    """Category/target are informational: keep strings, stringify scalars, drop blanks."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value if isinstance(value, str) else str(value)


def _parse_json(text: str, label: str, field: str) -> list[Prompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise DataError(f"{label} is not valid JSON: {exc.msg} ({where}).") from None
    if not isinstance(data, list):
        kind = type(data).__name__
        raise DataError(f"{label} must hold a JSON list of objects or strings, not a {kind}.")
    return [_record(rec, label, f"record {i}", field) for i, rec in enumerate(data)]


def _parse_jsonl(text: str, label: str, field: str) -> list[Prompt]:
    prompts: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{label} has invalid JSON on line {lineno}: {exc.msg}.") from None
        prompts.append(_record(rec, label, f"record {len(prompts)} (line {lineno})", field))
    return prompts


def _parse_csv(text: str, label: str, field: str) -> list[Prompt]:
    # strict: an unterminated quote is an error instead of swallowing the rest of the file as one field
    reader = csv.DictReader(io.StringIO(text, newline=""), restval="", strict=True)  # short rows read as empty
    try:
        header = reader.fieldnames
        if header is None:
            return []
        if field not in header:
            raise DataError(f"{label} has no {field!r} column (header: {', '.join(header)}).")
        return [
            _record({k: v for k, v in row.items() if k is not None}, label, f"row {i}", field)
            for i, row in enumerate(reader)
        ]
    except csv.Error as exc:
        raise DataError(f"{label} is not valid CSV (line {reader.line_num}): {exc}.") from None


def _parse_txt(text: str, label: str, field: str) -> list[Prompt]:
    del label, field  # one prompt per line: there is no field to pick
    return [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
