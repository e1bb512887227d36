"""Full directional ablation (Arditi et al.): the directions removed from every residual write.

Hooks (:func:`ablate`): block inputs and attention/MLP writes projected (Gemma-2's post-norm outputs),
at every position, including tokens produced during generation; they keep autograd intact, so the
gradient methods (RDO, cones, RepInd) train through them on their live direction tensors.
Weights: the embedding rows and every block's o_proj/down_proj (and biases) mapped by the write
map of :mod:`refusal_atlas.edits.writes` (tied embeddings are untied first).

For ``mode="subspace"`` (or k = 1, or mutually orthogonal directions) the map is a projector, so
projecting block inputs again changes nothing and hooks equal weights. For correlated directions
in ``mode="sequential"`` the map T (a product of rank-1 projectors) is not idempotent: hooks apply
it once more at every block input, weights do not. Then the weight form — what the SOM paper's
code does — is the edit, and :meth:`Edit.apply` evaluates it as weights; except for the ablation of
a run's direction set (:meth:`DirectionalAblation.from_directions`), which runs evaluate, selection,
the SOM subset search and the paper reproductions have always measured with the hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from refusal_atlas.core.errors import ModelError
from refusal_atlas.edits.base import Edit, WeightSnapshot, as_adapter, untie_embeddings
from refusal_atlas.edits.identity import SetIdentity
from refusal_atlas.edits.offloaded import orthogonalize_offloaded
from refusal_atlas.edits.projection import AblationMode, as_matrix, check_mode, projector
from refusal_atlas.edits.writes import edit_linear, edit_write, map_in_place, map_writes, prepare
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.hooks import Hooks
from refusal_atlas.model.placement import is_offloaded


@contextmanager
def ablate(model: nn.Module | ModelAdapter, directions, mode: AblationMode = "subspace",
           layers: Sequence[int] | None = None) -> Iterator[None]:
    """Project ``directions`` (a DirectionSet, [d] or [k, d], used as given) out of the residual stream:
    the input of every block in ``layers`` (default all) and its attention and MLP writes."""
    adapter = as_adapter(model)
    fn = projector(directions, mode)
    with Hooks() as hooks:
        for layer in layers if layers is not None else range(adapter.n_layers):
            adapter.check_layer(layer)
            hooks.inputs(adapter.layers[layer], fn)
            hooks.outputs(adapter.attn_write(layer), fn)
            hooks.outputs(adapter.mlp_write(layer), fn)
        yield


class DirectionalAblation(Edit):
    """Ablation of k directions (``mode`` subspace | sequential) as hooks, weights or an export.

    ``DirectionalAblation(vectors)`` is an edit artifact (labelled ``edit:NAME@<fingerprint>``);
    :meth:`from_directions` is the ablation of a run's direction set as evaluation records it.
    """

    edit_type = "ablation"

    def __init__(self, directions, mode: AblationMode = "subspace", *, name: str | None = None,
                 meta: dict[str, Any] | None = None):
        self.vectors = as_matrix(directions).detach().to(torch.float32).cpu()
        self.mode = check_mode(mode)
        self.name = name
        self.meta = {"method": getattr(directions, "method", "custom"), **(meta or {})}
        ids = getattr(directions, "ids", None)
        if ids is not None:
            self.meta.setdefault("direction_ids", list(ids))
            self.meta.setdefault("layer", getattr(directions, "layer", None))

    @classmethod
    def from_directions(cls, directions, mode: AblationMode = "subspace", *, layer: int | None = None,
                        label: str | None = None) -> DirectionalAblation:
        """Ablate a direction set (a DirectionSet, or [k, d] / [d] vectors with an optional ``layer``) as a
        run evaluates it: labelled ``ablate:<file or method>`` (+ ``[k=..,mode]`` for k > 1) unless
        ``label`` is given, recorded with the set's fingerprint, layer and ids (see
        :mod:`refusal_atlas.edits.identity`), and applied as hooks on the set's own vectors in either mode."""
        identity = SetIdentity(directions, layer, label)
        edit = cls(directions, mode)
        edit.identity = identity
        return edit

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def label(self) -> str:
        if self.identity is None:
            return super().label
        k = self.identity.k
        return self.identity.label or f"ablate:{self.identity.source}" + (f"[k={k},{self.mode}]" if k > 1 else "")

    def describe(self) -> dict[str, Any]:
        if self.identity is None:
            return super().describe()
        return {**self.identity.describe(self.label, self.kind), "mode": self.mode}

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

    @property
    def evaluated_form(self) -> str:
        return "hooks" if self.identity is not None else super().evaluated_form

    def hooks(self, model):
        adapter = as_adapter(model)
        self.check_model(adapter)
        return ablate(adapter, self.directions, mode=self.mode)

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
        map_in_place(emb.data, 1, lambda rows: map_writes(rows, prepared, 1.0, self.mode))
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
