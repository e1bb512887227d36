"""The Edit: one object per model change, usable as hooks, as a reversible weight edit, or exported.

Every model change is an Edit: no change (:class:`NoEdit`, the baseline every measurement is compared
with), directional ablation, activation addition, the per-layer kernel edits. Each has a JSON spec and
named tensors (saved as ``<name>.json`` + ``<name>.safetensors``) and a fingerprint over both, so a run
directory can say exactly which edit produced a number. Three ways to use one, all on the same object:

* ``edit.hooks(model)``: forward hooks, undone on exit (autograd-friendly, no weight copies);
* ``edit.weights(model)``: the weights edited in place and restored bit for bit on exit;
* ``edit.apply_weights(model)``: the same weight edit, permanent (what ``export`` writes).

``edit.apply(model)`` is what evaluation uses: the hooks when they are mathematically equal to the
weight edit, otherwise the weight edit itself, so an exported model is always the evaluated one.
Evaluation records an edit by ``kind`` (none | ablate | actadd), ``label`` and ``describe()``; an edit
made from a direction set is named by that set (:mod:`refusal_atlas.edits.identity`), a saved edit by
its file.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from refusal_atlas.core.errors import ArtifactError, ConfigError, ModelError
from refusal_atlas.core.io import load_tensors, read_json, save_tensors, write_json
from refusal_atlas.edits.identity import SetIdentity
from refusal_atlas.model.adapter import ModelAdapter

EDIT_TYPES: dict[str, type[Edit]] = {}


def as_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


class WeightSnapshot:
    """Original tensors of everything a weight edit touches, restored bit for bit by :meth:`restore`."""

    def __init__(self, adapter: ModelAdapter, permanent: bool = False):
        self.adapter = adapter
        self.permanent = permanent  # nothing will be restored (export): no copies need to be kept
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tied = adapter.embeddings_tied
        self.config_tied = getattr(adapter.model.config, "tie_word_embeddings", None)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.permanent and not any(t is tensor for t, _ in self.saved):
            self.saved.append((tensor, tensor.detach().clone()))
        return tensor

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, original in self.saved:
            tensor.copy_(original)
        model = self.adapter.model
        if self.tied and not self.adapter.embeddings_tied:
            model.lm_head.weight = self.adapter.embedding.weight
            _set_tied(model, self.config_tied)


def _set_tied(model: nn.Module, value) -> None:
    model.config.tie_word_embeddings = value
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = value


def untie_embeddings(adapter: ModelAdapter) -> bool:
    """Give the unembedding its own copy so editing the embedding leaves it alone; True if it was tied."""
    if not adapter.embeddings_tied:
        return False
    adapter.model.lm_head.weight = nn.Parameter(adapter.embedding.weight.detach().clone(), requires_grad=False)
    _set_tied(adapter.model, False)
    return True


class Edit(ABC):
    """Base class; subclasses set ``edit_type`` and implement spec/tensors/hooks/_edit_weights."""

    edit_type: ClassVar[str]
    kind: ClassVar[str] = "ablate"  # what evaluation records call it: none | ablate | actadd
    has_weight_form: ClassVar[bool] = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "edit_type" in cls.__dict__:
            EDIT_TYPES[cls.edit_type] = cls

    name: str | None = None
    meta: dict[str, Any]
    identity: SetIdentity | None = None  # the direction set it was made from, when records name it by that

    # --- what it is ---------------------------------------------------------------------------
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serializable parameters (no tensors)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors the edit needs (saved as float32 safetensors)."""

    @classmethod
    @abstractmethod
    def from_parts(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Edit:
        """Inverse of (spec, tensors)."""

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    n_layers: int | None = None  # edits tied to a layer count set it

    @property
    def directions(self) -> torch.Tensor:
        """All direction vectors as [k, d] rows (completions are fingerprinted by them): the whole set an
        edit was made from (as given), else the edit's own."""
        if self.identity is not None:
            return self.identity.matrix
        return next(iter(self.tensors().values())).reshape(-1, self.d_model)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps({"edit": self.edit_type, **self.spec()}, sort_keys=True).encode())
        for key, t in sorted(self.tensors().items()):
            h.update(key.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"edit:{self.name or self.edit_type}@{self.fingerprint()[:8]}"

    def describe(self) -> dict[str, Any]:
        return {"intervention": self.label, "kind": self.kind, "edit": self.edit_type,
                "fingerprint": self.fingerprint(), "method": self.meta.get("method", self.edit_type),
                "edit_spec": self.spec()}

    # --- using it ------------------------------------------------------------------------------
    def check_model(self, adapter: ModelAdapter) -> None:
        if adapter.d_model != self.d_model:
            raise ModelError(f"edit {self.label} was made for d_model {self.d_model}, this model has {adapter.d_model}")
        if self.n_layers is not None and adapter.n_layers != self.n_layers:
            raise ModelError(f"edit {self.label} was made for {self.n_layers} layers, this model has {adapter.n_layers}")

    @abstractmethod
    def hooks(self, model: nn.Module | ModelAdapter):
        """Context manager: the edit as forward hooks."""

    @property
    def hooks_equal_weights(self) -> bool:
        """Whether hooks and the weight edit give the same function (then hooks are used to evaluate)."""
        return True

    @abstractmethod
    def _edit_weights(self, adapter: ModelAdapter, snapshot: WeightSnapshot) -> dict[str, Any]:
        """Edit weights in place, calling ``snapshot.keep`` on each tensor before changing it."""

    @contextmanager
    def weights(self, model: nn.Module | ModelAdapter) -> Iterator[dict[str, Any]]:
        """The weight edit, in place; on exit every touched tensor (and embedding tying) is restored exactly."""
        adapter = as_adapter(model)
        self._check_weight_form(adapter)
        snapshot = WeightSnapshot(adapter)
        try:
            with torch.no_grad():
                report = self._edit_weights(adapter, snapshot)
            yield report
        finally:
            snapshot.restore()

    def apply_weights(self, model: nn.Module | ModelAdapter) -> dict[str, Any]:
        """The weight edit, permanently (for export: LoRA/GGUF/safetensors writers take the edited model)."""
        adapter = as_adapter(model)
        self._check_weight_form(adapter)
        with torch.no_grad():
            return self._edit_weights(adapter, WeightSnapshot(adapter, permanent=True))

    def _check_weight_form(self, adapter: ModelAdapter) -> None:
        self.check_model(adapter)
        if not self.has_weight_form:
            raise ConfigError(f"{self.edit_type} edits exist as hooks only (no weight form to export); "
                              "evaluate them with hooks")

    @property
    def evaluated_form(self) -> str:
        """``"hooks"`` or ``"weights"``: the form :meth:`apply` uses."""
        return "hooks" if not self.has_weight_form or self.hooks_equal_weights else "weights"

    def apply(self, model: nn.Module | ModelAdapter):
        """The form evaluation uses: hooks where they equal the weight edit, else the weight edit."""
        adapter = as_adapter(model)
        self.check_model(adapter)
        return self.hooks(adapter) if self.evaluated_form == "hooks" else self.weights(adapter)

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.json`` (spec, fingerprint) and ``<path>.safetensors`` (tensors); returns the .json."""
        stem = Path(path).with_suffix("")
        save_tensors(stem.with_suffix(".safetensors"), {k: v.to(torch.float32) for k, v in self.tensors().items()},
                     {"edit": self.edit_type})
        return write_json(stem.with_suffix(".json"), {"edit": self.edit_type, "name": self.name,
                                                      "fingerprint": self.fingerprint(), "spec": self.spec(),
                                                      "tensors": stem.with_suffix(".safetensors").name})


class NoEdit(Edit):
    """The unedited model, as an edit: the baseline every measurement is compared with.

    Hooks and weight edits do nothing; it has no directions and no fingerprint, so its records are
    ``{"intervention": "none", "kind": "none"}`` and its completions are keyed by those alone.
    """

    edit_type = "none"
    kind = "none"
    label = "none"
    directions = None  # type: ignore[assignment]

    def __init__(self, *, name: str | None = None, meta: dict[str, Any] | None = None):
        self.name, self.meta = name, dict(meta or {})

    def spec(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_parts(cls, spec, tensors):
        return cls()

    @property
    def d_model(self) -> int | None:  # type: ignore[override]
        return None  # fits any model (check_model, load_run_edit): nothing to check

    def fingerprint(self) -> None:  # type: ignore[override]
        return None

    def describe(self) -> dict[str, Any]:
        return {"intervention": self.label, "kind": self.kind}

    def check_model(self, adapter: ModelAdapter) -> None:
        pass

    def hooks(self, model):
        return nullcontext()

    def apply(self, model):
        return self.hooks(model)

    def weights(self, model):
        return nullcontext({})

    def apply_weights(self, model) -> dict[str, Any]:
        return {}

    def _edit_weights(self, adapter, snapshot: WeightSnapshot) -> dict[str, Any]:
        return {}


def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit saved by :meth:`Edit.save`; the stored fingerprint must match what was loaded."""
    stem = Path(path).with_suffix("")
    if not stem.with_suffix(".json").is_file():
        raise ArtifactError(f"no saved edit at {stem.with_suffix('.json')}")
    doc = read_json(stem.with_suffix(".json"))
    if not isinstance(doc, dict) or doc.get("edit") not in EDIT_TYPES or not isinstance(doc.get("spec"), dict):
        raise ArtifactError(f"{stem.with_suffix('.json')} is not a saved edit (known types: {sorted(EDIT_TYPES)})")
    tensors, _ = load_tensors(stem.with_suffix(".safetensors"))
    try:
        edit = EDIT_TYPES[doc["edit"]].from_parts(doc["spec"], tensors)
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{stem.with_suffix('.json')} is incomplete or malformed ({exc})") from None
    edit.name = doc.get("name") or stem.name
    if doc.get("fingerprint") not in (None, edit.fingerprint()):
        raise ArtifactError(f"{stem} does not match its recorded fingerprint (edited or corrupt files)")
    return edit


def load_run_edit(run_dir: str | os.PathLike, name: str) -> Edit:
    """A run's saved edit (``edits/NAME.json``), checked against the run's model (manifest) before any load."""
    run_dir = Path(run_dir)
    edit = load_edit(run_dir / "edits" / name)
    manifest = run_dir / "manifest.json"
    model = read_json(manifest).get("model", {}) if manifest.is_file() else {}
    for what, have in (("d_model", edit.d_model), ("n_layers", edit.n_layers)):
        if have is not None and model.get(what) not in (None, have):
            raise ModelError(f"edit {name!r} was made for {what} {have}, but {run_dir}'s model has {model[what]}")
    return edit
