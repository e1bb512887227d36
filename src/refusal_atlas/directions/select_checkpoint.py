"""Selection progress on disk: each scored candidate saved atomically as soon as it is done.

A rerun after a crash (or kill -9) reads back the finished candidates instead of recomputing them.
The file is keyed by everything the scores depend on (candidate vectors, validation prompts,
refusal token ids, batch size); a file made from anything else is ignored and replaced.
The crash-test hook ``REFUSAL_ATLAS_TEST_KILL_AFTER=N`` SIGKILLs the process right after the Nth save
(core/crashpoints.py), so tests can kill a selection at a known point.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from refusal_atlas.core.crashpoints import kill_after_save
from refusal_atlas.core.io import read_json, write_json


def _key(candidates, eligible, harmful, harmless, refusal_ids, batch_size) -> str:
    h = hashlib.sha256(json.dumps([list(map(list, eligible)), list(harmful), list(harmless), list(refusal_ids),
                                   batch_size]).encode())
    for p, l in eligible:
        h.update(candidates.at(layer=l, position=p).vectors.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


class SelectionCheckpoint:
    def __init__(self, path: str | Path | None, candidates, eligible: Sequence[tuple[int, int]],
                 harmful: Sequence[str], harmless: Sequence[str], refusal_ids: Sequence[int], batch_size: int):
        self.path = Path(path) if path is not None else None
        self.key = _key(candidates, eligible, harmful, harmless, refusal_ids, batch_size)
        self.data: dict = {"key": self.key, "refusal": {}, "filters": {}}
        self.saves = 0
        if self.path is not None and self.path.is_file():
            try:
                old = read_json(self.path)
            except Exception:  # a torn or foreign file is simply not reused
                old = None
            if isinstance(old, dict) and old.get("key") == self.key:
                self.data.update({k: dict(old.get(k, {})) for k in ("refusal", "filters")})

    @property
    def reused(self) -> int:
        return len(self.data["refusal"]) + len(self.data["filters"])

    def get(self, stage: str, position: int, layer: int) -> dict | None:
        return self.data[stage].get(f"{position},{layer}")

    def put(self, stage: str, position: int, layer: int, record: dict) -> dict:
        self.data[stage][f"{position},{layer}"] = record
        if self.path is not None:
            write_json(self.path, self.data)
            self.saves += 1
            kill_after_save(self.saves)
        return record
