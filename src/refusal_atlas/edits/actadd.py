"""Activation addition (ActAdd): coeff × a vector added to one block's input at every position.

The vector's norm sets the strength (Arditi et al. add the raw difference-in-means); coeff=-1
subtracts it.

Hooks only. A weight form would need a bias on the previous block's MLP down-projection, which the
supported families (Qwen2, Llama, Mistral, Gemma) do not have in their configs, and adding the
vector to the embedding rows would shift every layer, not just this one. So ``weights`` and
``apply_weights`` raise, and ``export`` refuses an ActAdd edit with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits.base import Edit, as_adapter
from refusal_atlas.edits.identity import SetIdentity
from refusal_atlas.edits.projection import as_matrix
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.hooks import hook_inputs


@contextmanager
def add_activation(model: nn.Module | ModelAdapter, vector: torch.Tensor, layer: int,
                   coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * vector`` (used as given: autograd flows through it) to the input of block ``layer``."""
    adapter = as_adapter(model)
    adapter.check_layer(layer)
    vec = as_matrix(vector)
    if vec.shape[0] != 1:
        raise ConfigError("activation addition takes one vector")
    delta = coeff * vec[0]
    with hook_inputs(adapter.layers[layer], lambda x: x + delta.to(x.dtype).to(x.device)):
        yield


class ActAdd(Edit):
    """``coeff`` × one vector added at block ``layer``'s input; :meth:`from_directions` adds the first
    vector of a run's direction set as evaluation records it."""

    edit_type = "actadd"
    kind = "actadd"
    has_weight_form = False

    def __init__(self, vector, layer: int, coeff: float = 1.0, *, name: str | None = None,
                 meta: dict[str, Any] | None = None):
        self.vector = as_matrix(vector)[0].detach().to(torch.float32).cpu()
        self.layer, self.coeff, self.name = int(layer), float(coeff), name
        self.meta = {"method": getattr(vector, "method", "custom"), **(meta or {})}

    @classmethod
    def from_directions(cls, directions, coeff: float = 1.0, *, layer: int | None = None,
                        label: str | None = None) -> ActAdd:
        """Add ``coeff`` × the first vector of a direction set at ``layer`` (default: the set's), labelled
        ``actadd:<file or method>@<layer>x<coeff>`` unless ``label`` is given and recorded with the whole
        set's fingerprint, layer and ids (see :mod:`refusal_atlas.edits.identity`)."""
        identity = SetIdentity(directions, layer, label)
        if identity.layer is None:
            raise ConfigError("actadd needs a layer")
        edit = cls(directions, identity.layer, coeff)
        edit.identity = identity
        return edit

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def label(self) -> str:
        if self.identity is None:
            return super().label
        return self.identity.label or f"actadd:{self.identity.source}@{self.layer}x{self.coeff:g}"

    def describe(self) -> dict[str, Any]:
        if self.identity is None:
            return super().describe()
        return {**self.identity.describe(self.label, self.kind), "coeff": self.coeff}

    def spec(self) -> dict[str, Any]:
        return {"layer": self.layer, "coeff": self.coeff, "d_model": self.d_model, "meta": self.meta}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    @classmethod
    def from_parts(cls, spec, tensors):
        return cls(tensors["vector"], spec["layer"], spec["coeff"], meta=spec.get("meta"))

    def hooks(self, model):
        adapter = as_adapter(model)
        self.check_model(adapter)
        return add_activation(adapter, self.directions[0], self.layer, self.coeff)

    def _edit_weights(self, adapter, snapshot):  # pragma: no cover - guarded by has_weight_form
        raise AssertionError("ActAdd has no weight form")
