"""Training checkpoints: a killed gradient run resumes at its last step and ends with the same bits.

Inside :func:`checkpointing` (a run directory's ``checkpoints/<name>/``), the n-th call of the
training loop owns ``run<n>.safetensors``: the iterate, the best and last good iterates, AdamW's
state and the sampler's RNG as tensors, and the step, learning rates, histories and model-selection
counters as JSON metadata, written atomically after every step. A file is used only when its key
(settings, start, constraint, the caller's identity and the loss's captured settings) matches, so a
changed flag starts afresh instead of resuming someone else's run. A finished run keeps its final
state, so rerunning the same command after a crash recomputes nothing that was done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from refusal_atlas.core.errors import ArtifactError
from refusal_atlas.core.io import load_tensors, save_tensors


@dataclasses.dataclass
class _Session:
    directory: Path
    identity: str
    calls: int = 0


_session: ContextVar[_Session | None] = ContextVar("refusal_atlas_checkpoints", default=None)


@contextmanager
def checkpointing(directory: str | Path, identity: Any = None) -> Iterator[None]:
    """Checkpoint every training loop run inside the block under ``directory``."""
    token = _session.set(_Session(Path(directory), json.dumps(identity, sort_keys=True, default=str)))
    try:
        yield
    finally:
        _session.reset(token)


def next_checkpoint() -> tuple[Path, str] | None:
    """(file, caller identity) for the next training loop run, or None outside :func:`checkpointing`."""
    session = _session.get()
    if session is None:
        return None
    session.calls += 1
    return session.directory / f"run{session.calls}.safetensors", session.identity


def _digest(h, value: Any, depth: int) -> None:
    """Feed the settings a value carries into ``h`` (tensors by bytes; models and data by type only)."""
    if isinstance(value, torch.Tensor):
        h.update(value.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    elif isinstance(value, (int, float, str, bool, type(None))):
        h.update(repr(value).encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(repr(value).encode())
    elif isinstance(value, (list, tuple)) and len(value) <= 64:
        for v in value:
            _digest(h, v, depth)
    elif callable(value) and depth > 0 and getattr(value, "__closure__", None):
        h.update(value.__code__.co_code)
        for cell in value.__closure__:
            try:
                _digest(h, cell.cell_contents, depth - 1)
            except ValueError:  # an empty cell
                continue
    else:
        h.update(type(value).__name__.encode())


def checkpoint_key(identity: str, settings: dict, desc: str, n_examples: int, start: torch.Tensor,
                   constraint: torch.Tensor | None, loss_fn: Callable) -> str:
    h = hashlib.sha256(json.dumps([identity, settings, desc, n_examples], sort_keys=True).encode())
    for value in (start, constraint, loss_fn):
        _digest(h, value, depth=2)
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, key: str, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None) -> None:
    """One safetensors file: ``tensors`` + AdamW's per-parameter state; ``state`` + param groups as JSON."""
    out = dict(tensors)
    groups = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for k, v in sd["state"].get(0, {}).items():
            out[f"opt.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        groups = sd["param_groups"]
    save_tensors(path, out, {"key": key, "state": state, "param_groups": groups})


def load_checkpoint(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict | None] | None:
    """(tensors, state, optimizer state dict) of a matching checkpoint, or None (missing, other key, unreadable)."""
    if not path.is_file():
        return None
    try:
        tensors, meta = load_tensors(path)
    except ArtifactError:
        return None
    if meta.get("key") != key:
        return None
    opt = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    groups = meta.get("param_groups")
    opt_state = {"state": {0: opt} if opt else {}, "param_groups": groups} if groups is not None else None
    return {k: v for k, v in tensors.items() if not k.startswith("opt.")}, meta["state"], opt_state
