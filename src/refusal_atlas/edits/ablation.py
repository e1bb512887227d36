"""Full directional ablation (Arditi et al.): the directions removed from every residual write.

Hooks: :func:`refusal_atlas.edits.interventions.ablate` (block inputs and attention/MLP writes projected).
Weights: the embedding rows and every block's o_proj/down_proj (and biases) mapped by the write
map of :mod:`refusal_atlas.edits.writes` (tied embeddings are untied first).

For ``mode="subspace"`` (or k = 1, or mutually orthogonal directions) the map is a projector, so
projecting block inputs again changes nothing and hooks equal weights. For correlated directions
in ``mode="sequential"`` the map T (a product of rank-1 projectors) is not idempotent: hooks apply
it once more at every block input, weights do not. Then the weight form — what the SOM paper's
code does — is the edit, and :meth:`Edit.apply` evaluates it as weights.
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.edits.base import Edit, WeightSnapshot, as_adapter, untie_embeddings
from refusal_atlas.edits.writes import WriteMode, check_mode, edit_linear, edit_write, map_writes, prepare
from refusal_atlas.core.errors import ModelError
from refusal_atlas.edits.interventions import ablate, as_matrix
from refusal_atlas.model.placement import is_offloaded
from refusal_atlas.edits.offloaded import orthogonalize_offloaded


class DirectionalAblation(Edit):
    edit_type = "ablation"

    def __init__(self, directions, mode: WriteMode = "subspace", *, name: str | None = None,
                 meta: dict[str, Any] | None = None):
        self.vectors = as_matrix(directions).detach().to(torch.float32).cpu()
        self.mode = check_mode(mode)
        self.name = name
        self.meta = {"method": getattr(directions, "method", "custom"), **(meta or {})}
        ids = getattr(directions, "ids", None)
        if ids is not None:
            self.meta.setdefault("direction_ids", list(ids))
            self.meta.setdefault("layer", getattr(directions, "layer", None))

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    def spec(self) -> dict[str, Any]:
        return {"mode": self.mode, "k": int(self.vectors.shape[0]), "d_model": self.d_model, "meta": self.meta}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"directions": self.vectors}

    @classmethod
    def from_parts(cls, spec, tensors):
        return cls(tensors["directions"], spec["mode"], meta=spec.get("meta"))

    @property
    def hooks_equal_weights(self) -> bool:
        if self.mode == "subspace" or self.vectors.shape[0] == 1:
            return True
        u = prepare(self.vectors, "sequential").to(torch.float64)
        gram = u @ u.T
        return bool((gram - torch.eye(len(u), dtype=gram.dtype)).abs().max() < 1e-6)

    def hooks(self, model):
        adapter = as_adapter(model)
        self.check_model(adapter)
        return ablate(adapter, self.vectors, mode=self.mode)

    def _edit_weights(self, adapter, snapshot: WeightSnapshot) -> dict[str, Any]:
        if adapter.has_post_norms:
            raise ModelError(
                f"{adapter.model_type} rescales attention/MLP outputs with post-norms before the residual add, "
                "so orthogonalized weights would not match hook ablation; use hook ablation for this model")
        if is_offloaded(adapter.model):
            if not snapshot.permanent:
                raise ModelError("in-place weight edits that are undone on exit need the weights in memory; "
                                 "this model is partly offloaded: use hooks, or export the edit")
            if self.mode != "subspace" and not self.hooks_equal_weights:
                raise ModelError("sequential ablation of correlated directions cannot be written into offloaded "
                                 "weights; place the model without offload")
            return orthogonalize_offloaded(adapter, self.vectors)
        prepared = prepare(self.vectors, self.mode)
        untied = untie_embeddings(adapter)
        emb = snapshot.keep(adapter.embedding.weight)
        emb.data.copy_(map_writes(emb.data, prepared, 1.0, self.mode))
        mlp_weights = 0
        for layer in range(adapter.n_layers):
            proj = adapter.attn_out_proj(layer)
            snapshot.keep(proj.weight)
            if proj.bias is not None:
                snapshot.keep(proj.bias)
            edit_linear(proj, prepared, 1.0, self.mode)
            for write in adapter.mlp_write_weights(layer):  # dense down_proj, or every expert + shared expert
                snapshot.keep(write.weight)
                if write.bias is not None:
                    snapshot.keep(write.bias)
                edit_write(write, prepared, 1.0, self.mode)
                mlp_weights += 1
        return {"rank": int(self.vectors.shape[0]) if self.mode == "sequential" else int(prepared.shape[0]),
                "mode": self.mode, "untied_embeddings": untied, "layers": adapter.n_layers,
                "mlp_weights": mlp_weights, "moe_layers": sum(adapter.is_moe(l) for l in range(adapter.n_layers))}
