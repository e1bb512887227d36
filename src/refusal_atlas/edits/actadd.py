"""Activation addition (ActAdd): coeff × a vector added to one block's input at every position.

Hooks only. A weight form would need a bias on the previous block's MLP down-projection, which the
supported families (Qwen2, Llama, Mistral, Gemma) do not have in their configs, and adding the
vector to the embedding rows would shift every layer, not just this one. So ``weights`` and
``apply_weights`` raise, and ``export`` refuses an ActAdd edit with a clear error.
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.edits.base import Edit, as_adapter
from refusal_atlas.edits.interventions import add_activation, as_matrix


class ActAdd(Edit):
    edit_type = "actadd"
    kind = "actadd"
    has_weight_form = False

    def __init__(self, vector, layer: int, coeff: float = 1.0, *, name: str | None = None,
                 meta: dict[str, Any] | None = None):
        self.vector = as_matrix(vector)[0].detach().to(torch.float32).cpu()
        self.layer, self.coeff, self.name = int(layer), float(coeff), name
        self.meta = {"method": getattr(vector, "method", "custom"), **(meta or {})}

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

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
        return add_activation(adapter, self.vector, self.layer, self.coeff)

    def _edit_weights(self, adapter, snapshot):  # pragma: no cover - guarded by has_weight_form
        raise AssertionError("ActAdd has no weight form")
