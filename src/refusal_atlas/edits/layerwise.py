"""Per-layer strength ablation (the heretic-llm edit family): block j's writes mapped with weight w_j.

Block j's attention out-projection and MLP down-projection outputs are mapped by the write map of
:mod:`refusal_atlas.edits.writes` with strength ``attn_weights[j]`` / ``mlp_weights[j]`` (typically
from two :class:`~refusal_atlas.edits.kernel.StrengthKernel`) and block j's own directions
``directions[j]`` ([L, k, d]: one DIM direction per block, one interpolated direction repeated, or a
SOM subset). The weight form is ``W ← W − w·r rᵀW`` per unit r (k = 1). The embedding rows (each the
vector a token writes into the residual) are mapped with ``embed_weight`` and block 0's directions
(default 0: not edited, as in heretic; 1 with all block weights 1 is full directional ablation).

**Norm-preserving** (``norm_preserving=True``, grimjim's magnitude-preserving ablation): after the
edit each column of W — the vector one input feature writes into the residual — is rescaled to its
original norm: W' = T W diag(c), c_j = ‖W[:, j]‖ / ‖T W[:, j]‖. Hook form: scale the out-projection's
*input* by c and map its output by T — exactly equal, so both forms exist and are tested equal.

**Transforms** (``transform``, see :mod:`refusal_atlas.edits.writes`): ``project`` (the map above),
``householder`` (reflect the writes along the directions: W ← (I − 2w·P) W) and ``biproject`` (project,
with block j's directions orthogonalized against ``harmless_means[j+1]``, the harmless mean of the residual
block j writes into — the last block uses layer L−1, the embedding layer 0). Both keep the hook form.

Hooks sit on the out-projections themselves, so hooks equal weights for every architecture
(Gemma-2's post-norms come after the out-projection and see the same values either way).

**Mixture-of-experts blocks** (expert-granular, abliterix 1.12): the block's MLP weight edits *every* expert's
down-projection — fused [E, d, inter], transposed [E, inter, d] or one Linear per expert, routed or not — and a
Qwen2-MoE shared expert's, each with the same map (norm-preserving: every expert's write vectors keep their
norms, exactly as a dense down_proj's columns). The hook maps the MoE block's *output*: that output is
Σ_e g_e(x)·(W_e h_e + b_e) + σ(s·x)·W_s h_s, where the routing weights g_e and the shared-expert gate σ(s·x)
are per-token scalars computed from the block's *input*, not from the expert outputs; T is linear, so
T(output) = Σ_e g_e·(T W_e h_e + T b_e) + σ·T W_s h_s — the weight edit of every expert and its bias,
exactly. Norm-preserving hooks also rescale each expert's write vectors (``Hooks.reparametrize``: fused
experts call no Linear whose input a hook could scale); the stored weights stay untouched. One weight for
all experts of a block: per-expert weights (say, by routing share on harmful prompts) are not offered.

**Router suppression** (``router_weight`` s > 0, off by default; the directional form of abliterix 1.12's router
suppression, which instead shrinks the gate rows of the few experts that fire most on harmful prompts, found by
profiling the routing — ours needs no profiling and leaves expert preferences unrelated to r alone): every MoE block's
router (its ``gate``, weight [E, d_model], one logit w_eᵀx per expert) stops reading block j's directions:
w_e ← w_e − s·P w_e for every expert e, P the projector onto span(directions[j]) (always ``subspace``, and
the directions as given — not biprojected — since the router reads the block's input, not a write). The
hook projects the router's input, x ↦ x − s·P x, which gives the same logits because P is symmetric:
w_eᵀ(x − sPx) = (w_e − sPw_e)ᵀx. No shipped family's router has a bias, so no bias suppression.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits.base import Edit, WeightSnapshot, as_adapter, untie_embeddings
from refusal_atlas.edits.kernel import StrengthKernel
from refusal_atlas.edits.projection import AblationMode, check_mode, orthogonalize_against
from refusal_atlas.edits.writes import (REFLECTION, Transform, check_transform, edit_write, map_in_place, map_writes,
                                        prepare, write_norm_scale)
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.hooks import Hooks

COMPONENTS = ("attn", "mlp")


class LayerwiseAblation(Edit):
    edit_type = "layerwise"

    def __init__(self, directions: torch.Tensor, attn_weights, mlp_weights, *, mode: AblationMode = "subspace",
                 norm_preserving: bool = False, embed_weight: float = 0.0, transform: Transform = "project",
                 harmless_means: torch.Tensor | None = None, router_weight: float = 0.0, name: str | None = None,
                 meta: dict[str, Any] | None = None):
        d = directions.detach().to(torch.float32).cpu()
        if d.ndim == 2:
            d = d.unsqueeze(1)
        if d.ndim != 3 or d.shape[0] == 0 or d.shape[1] == 0:
            raise ConfigError(f"layerwise directions must be [n_layers, k, d], got {tuple(directions.shape)}")
        if not torch.isfinite(d).all() or (d.norm(dim=-1) < 1e-12).any():
            raise ConfigError("layerwise directions contain NaN/inf or zero vectors")
        self.per_layer = d
        self.n_layers = int(d.shape[0])
        self.attn_weights = [float(w) for w in attn_weights]
        self.mlp_weights = [float(w) for w in mlp_weights]
        for what, ws in (("attn", self.attn_weights), ("mlp", self.mlp_weights)):
            if len(ws) != self.n_layers:
                raise ConfigError(f"{len(ws)} {what} weights for {self.n_layers} layers")
        self.mode, self.norm_preserving, self.name = check_mode(mode), bool(norm_preserving), name
        self.embed_weight = float(embed_weight)
        if self.embed_weight < 0:
            raise ConfigError(f"embedding weight must be >= 0, got {self.embed_weight}")
        self.transform = check_transform(transform)
        self.router_weight = float(router_weight)
        if not (self.router_weight >= 0 and self.router_weight < float("inf")):
            raise ConfigError(f"router suppression weight must be finite and >= 0, got {router_weight}")
        self.harmless_means = self._check_means(harmless_means)
        self.meta = dict(meta or {})

    def _check_means(self, means: torch.Tensor | None) -> torch.Tensor | None:
        if self.transform != "biproject":
            if means is not None:
                raise ConfigError("harmless means are used by the biproject transform only")
            return None
        if means is None:
            raise ConfigError("the biproject transform needs the harmless mean of every layer ([n_layers, d_model])")
        m = means.detach().to(torch.float32).cpu()
        if m.shape != (self.n_layers, self.d_model) or not torch.isfinite(m).all() or (m.norm(dim=-1) < 1e-12).any():
            raise ConfigError(f"harmless means must be finite, non-zero [n_layers={self.n_layers}, "
                              f"d_model={self.d_model}], got {tuple(means.shape)}")
        return m

    @classmethod
    def from_kernels(cls, directions: torch.Tensor, attn: StrengthKernel, mlp: StrengthKernel, **kw) -> LayerwiseAblation:
        n = int(directions.shape[0])
        meta = {**kw.pop("meta", {}), "kernels": {"attn": attn.__dict__, "mlp": mlp.__dict__}}
        return cls(directions, attn.check(n, "attention kernel").weights(n), mlp.check(n, "MLP kernel").weights(n),
                   meta=meta, **kw)

    @property
    def d_model(self) -> int:
        return int(self.per_layer.shape[2])

    def scaled(self, strength: float) -> LayerwiseAblation:
        """The same edit with every strength (attn, MLP, embedding, router) multiplied by ``strength``: what a
        strength sweep at matched KL needs. Built here, next to the fields, so a sweep can never drop one
        (transform, harmless means, mode, norm preservation)."""
        s = float(strength)
        return LayerwiseAblation(self.per_layer, [s * w for w in self.attn_weights], [s * w for w in self.mlp_weights],
                                 mode=self.mode, norm_preserving=self.norm_preserving, embed_weight=s * self.embed_weight,
                                 transform=self.transform, harmless_means=self.harmless_means,
                                 router_weight=s * self.router_weight, name=f"{self.name or 'edit'}_x{s:.4g}",
                                 meta={**self.meta, "scaled_by": s})

    def spec(self) -> dict[str, Any]:
        out = {"mode": self.mode, "norm_preserving": self.norm_preserving, "n_layers": self.n_layers,
               "k": int(self.per_layer.shape[1]), "d_model": self.d_model, "attn_weights": self.attn_weights,
               "mlp_weights": self.mlp_weights, "embed_weight": self.embed_weight, "meta": self.meta}
        if self.transform != "project":  # absent for projection: edits saved before transforms keep their fingerprint
            out["transform"] = self.transform
        if self.router_weight:  # absent when off: dense edits keep their fingerprint
            out["router_weight"] = self.router_weight
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"directions": self.per_layer}
        if self.harmless_means is not None:
            out["harmless_means"] = self.harmless_means
        return out

    @classmethod
    def from_parts(cls, spec, tensors):
        return cls(tensors["directions"], spec["attn_weights"], spec["mlp_weights"], mode=spec["mode"],
                   norm_preserving=spec["norm_preserving"], embed_weight=spec.get("embed_weight", 0.0),
                   transform=spec.get("transform", "project"), harmless_means=tensors.get("harmless_means"),
                   router_weight=spec.get("router_weight", 0.0), meta=spec.get("meta"))

    def _prepared(self, block: int, written: int) -> torch.Tensor:
        """Block ``block``'s directions as the write map uses them (biproject: orthogonalized against the
        harmless mean of layer ``written``, the residual they are written into)."""
        d = self.per_layer[block]
        if self.harmless_means is not None:
            g = self.harmless_means[written]
            cos = (d @ g).abs() / (d.norm(dim=-1) * g.norm())
            if (cos > 1 - 1e-9).any():
                raise ConfigError(f"block {block}'s direction is parallel to the harmless mean of layer {written}: "
                                  "nothing is left to biproject")
            d = orthogonalize_against(d, g)
        return prepare(d, self.mode)

    def _strength(self, weight: float) -> float:
        return weight * REFLECTION[self.transform]

    def _targets(self, adapter):
        """(block, component, prepared directions, strength) for every write with a non-zero weight."""
        for j in range(self.n_layers):
            prepared = None
            for comp, weight in zip(COMPONENTS, (self.attn_weights[j], self.mlp_weights[j])):
                if weight == 0.0:
                    continue
                prepared = self._prepared(j, min(j + 1, self.n_layers - 1)) if prepared is None else prepared
                yield j, comp, prepared, self._strength(weight)

    def _routers(self, adapter):
        """(router, its prepared directions) of every MoE block, when router suppression is on."""
        if not self.router_weight:
            return
        for j in range(self.n_layers):
            if adapter.is_moe(j):
                yield adapter.router(j), prepare(self.per_layer[j], "subspace")

    def check_model(self, adapter: ModelAdapter) -> None:
        super().check_model(adapter)
        if self.router_weight and not any(adapter.is_moe(j) for j in range(adapter.n_layers)):
            raise ModelError(f"router suppression (router weight {self.router_weight:g}) needs mixture-of-experts "
                             f"blocks; {adapter.model_type} has none")

    def hooks(self, model):
        adapter = as_adapter(model)
        self.check_model(adapter)
        return self._hooks(adapter)

    @contextmanager
    def _hooks(self, adapter: ModelAdapter) -> Iterator[None]:
        with Hooks() as hooks:
            if self.embed_weight:
                p0 = self._prepared(0, 0).to(adapter.device)
                hooks.outputs(adapter.embedding, lambda y: self._map_embedding(y, p0))
            for j, comp, prepared, weight in self._targets(adapter):
                p = prepared.to(adapter.device)
                moe = comp == "mlp" and adapter.is_moe(j)
                # a MoE block's output is linear in its experts' writes (module docstring): map it once
                write = adapter.mlp_write(j) if moe else adapter.attn_out_proj(j) if comp == "attn" else \
                    adapter.mlp_out_proj(j)
                hooks.outputs(write, lambda y, p=p, w=weight: map_writes(y, p, w, self.mode))
                if not self.norm_preserving:
                    continue
                if not moe:
                    scale = write_norm_scale(write.weight, 0, p, weight, self.mode)
                    hooks.inputs(write, lambda x, s=scale: x * s.to(x.device, x.dtype))
                    continue
                for ww in adapter.mlp_write_weights(j):  # every expert's (and the shared expert's) write vectors
                    scale = write_norm_scale(ww.weight, ww.d_axis, p, weight, self.mode).unsqueeze(ww.d_axis)
                    hooks.reparametrize(ww.owner, ww.attr, lambda t, s=scale: t * s.to(t.device, t.dtype))
            for router, p in self._routers(adapter):
                p = p.to(adapter.device)
                hooks.inputs(router, lambda x, p=p: map_writes(x, p, self.router_weight, "subspace"))
            yield

    def _map_embedding(self, rows: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        """Embedding rows (or looked-up vectors: the same thing) mapped, norms kept if norm-preserving."""
        out = map_writes(rows, prepared, self._strength(self.embed_weight), self.mode)
        if not self.norm_preserving:
            return out
        r32, o32 = rows.to(torch.float32), out.to(torch.float32)
        return (o32 * (r32.norm(dim=-1, keepdim=True) / o32.norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(rows.dtype)

    def _edit_weights(self, adapter, snapshot: WeightSnapshot) -> dict[str, Any]:
        from refusal_atlas.model.placement import is_offloaded

        if is_offloaded(adapter.model):
            raise ModelError("per-layer strength weight edits of a partly offloaded model are not supported; "
                             "evaluate them with hooks or place the model without offload")
        n, untied = 0, False
        if self.embed_weight:
            untied = untie_embeddings(adapter)
            emb = snapshot.keep(adapter.embedding.weight)
            p0 = self._prepared(0, 0).to(emb.device)
            map_in_place(emb.data, 1, lambda rows: self._map_embedding(rows, p0))
        for j, comp, prepared, weight in self._targets(adapter):
            # attention: its o_proj; MLP: a dense down_proj, or every expert's and the shared expert's
            for write in adapter.attn_write_weights(j) if comp == "attn" else adapter.mlp_write_weights(j):
                snapshot.keep(write.weight)
                if write.bias is not None:
                    snapshot.keep(write.bias)
                edit_write(write, prepared.to(write.weight.device), weight, self.mode, self.norm_preserving)
                n += 1
        routers = 0
        for router, p in self._routers(adapter):
            w = snapshot.keep(router.weight)
            map_in_place(w.data, 1, lambda rows, p=p.to(w.device): map_writes(rows, p, self.router_weight, "subspace"))
            routers += 1
        return {"matrices": n, "mode": self.mode, "norm_preserving": self.norm_preserving, "transform": self.transform,
                "untied_embeddings": untied, "routers": routers}
