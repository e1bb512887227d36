"""A trained low-rank update of the residual writers: the ARA-style edit (``edit_type = "lowrank"``).

heretic's experimental ARA branch ("Arbitrary-Rank Ablation", competing_tools.md §2.12) and heretic 2.0's
ARA modifier drop the refusal direction altogether: they train a LoRA on the attention out-projection and
the MLP down-projection so harmful prompts' representations move toward harmless ones. This module is the
*edit* such training produces: for each chosen block j and component c (``attn`` = o_proj, ``mlp`` =
down_proj), a rank-r update ΔW = B·A with A [r, d_in] and B [d_model, r]. How A and B are trained is in
:mod:`refusal_atlas.directions.ara`.

Three forms of the one edit:

* hooks: every target projection's output gets B·(A·x) added, x its own input (:meth:`Hooks.around`);
  A and B are used as given, so autograd reaches live tensors (training runs through these hooks);
* weights: W ← W + B·A, computed in float32 at least and rounded once to the model dtype;
* a PEFT LoRA adapter: the edit *is* one (``r`` = rank, ``lora_alpha`` = r so PEFT's scale is 1),
  written with A and B as they are by :func:`refusal_atlas.export.lora.write_lowrank_adapter`.

Hooks and weights agree up to float rounding ((W + BA)x against Wx + B(Ax)); tests check it. Hooks sit on
the projections themselves, so the forms agree for every architecture (Gemma-2's post-norms come after
the projection and see the same values either way). Mixture-of-experts MLPs have no single down-projection
and are refused. The edit records the blocks it changes; :attr:`directions` (what completion records are
keyed by, besides the fingerprint) are the columns of every B: the residual directions it writes along.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits.base import Edit, WeightSnapshot, as_adapter
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.hooks import Hooks

COMPONENTS = ("attn", "mlp")  # o_proj, down_proj
Target = tuple[int, str]


def projection(adapter: ModelAdapter, target: Target) -> nn.Linear:
    """The Linear a target names (block j's o_proj or dense down_proj)."""
    layer, component = target
    adapter.check_layer(layer)
    if component == "mlp" and adapter.is_moe(layer):
        raise ModelError(f"block {layer}'s MLP is a mixture of experts: it has no single down-projection for a "
                         "low-rank edit; choose layers with dense MLPs or the attention component only")
    return adapter.attn_out_proj(layer) if component == "attn" else adapter.mlp_out_proj(layer)


def low_rank_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B·(A·x) along the last axis of ``x`` (in ``x``'s dtype, promoted to float32 at least)."""
    work = torch.promote_types(x.dtype, torch.float32)
    return ((x.to(work) @ a.to(x.device, work).T) @ b.to(x.device, work).T)


@contextmanager
def add_low_rank(adapter: ModelAdapter, factors: dict[Target, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Hooks adding B·A·x to each target projection's output (A, B used as given: autograd flows to them)."""
    with Hooks() as hooks:
        for target, (a, b) in factors.items():
            proj = projection(adapter, target)

            def fn(x: torch.Tensor, y: torch.Tensor, a=a, b=b) -> torch.Tensor:
                return (y.to(torch.promote_types(y.dtype, torch.float32)) + low_rank_update(x, a, b)).to(y.dtype)

            hooks.around(proj, fn)
        yield


class LowRankEdit(Edit):
    """ΔW = B·A on each target projection; ``factors`` maps (block, "attn" | "mlp") to (A [r, d_in], B [d, r])."""

    edit_type = "lowrank"

    def __init__(self, factors: dict[Target, tuple[torch.Tensor, torch.Tensor]], n_layers: int, *,
                 name: str | None = None, meta: dict[str, Any] | None = None):
        if not factors:
            raise ConfigError("a low-rank edit needs at least one target projection")
        self.n_layers = int(n_layers)
        self.factors: dict[Target, tuple[torch.Tensor, torch.Tensor]] = {}
        ranks, widths = set(), set()
        for (layer, component), (a, b) in sorted(factors.items()):
            if component not in COMPONENTS or not 0 <= int(layer) < self.n_layers:
                raise ConfigError(f"bad low-rank target ({layer}, {component!r}): blocks 0..{self.n_layers - 1}, "
                                  f"components {COMPONENTS}")
            a32, b32 = a.detach().to(torch.float32).cpu(), b.detach().to(torch.float32).cpu()
            if a32.ndim != 2 or b32.ndim != 2 or a32.shape[0] != b32.shape[1]:
                raise ConfigError(f"target ({layer}, {component}): A must be [r, d_in] and B [d_model, r], got "
                                  f"{tuple(a.shape)} and {tuple(b.shape)}")
            if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
                raise ConfigError(f"target ({layer}, {component}): the factors contain NaN or inf")
            ranks.add(int(a32.shape[0]))
            widths.add(int(b32.shape[0]))
            self.factors[(int(layer), component)] = (a32, b32)
        if len(ranks) != 1 or len(widths) != 1:
            raise ConfigError(f"every target needs the same rank and output width, got ranks {sorted(ranks)}, "
                              f"widths {sorted(widths)}")
        self.rank = ranks.pop()
        self.name, self.meta = name, {"method": "ara", **(meta or {})}

    # --- what it is -------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(next(iter(self.factors.values()))[1].shape[0])

    @property
    def targets(self) -> list[Target]:
        return list(self.factors)

    @property
    def directions(self) -> torch.Tensor:
        return torch.cat([b.T for _, b in self.factors.values()])

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank, "n_layers": self.n_layers, "d_model": self.d_model,
                "targets": [[layer, component] for layer, component in self.factors], "meta": self.meta}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for (layer, component), (a, b) in self.factors.items():
            out[f"{layer}.{component}.A"], out[f"{layer}.{component}.B"] = a, b
        return out

    @classmethod
    def from_parts(cls, spec, tensors):
        factors = {(int(layer), str(comp)): (tensors[f"{layer}.{comp}.A"], tensors[f"{layer}.{comp}.B"])
                   for layer, comp in spec["targets"]}
        edit = cls(factors, spec["n_layers"], meta=spec.get("meta"))
        if edit.rank != spec["rank"] or edit.d_model != spec["d_model"]:
            raise ValueError("rank or d_model differ from the spec")
        return edit

    def scaled(self, factor: float, name: str | None = None) -> LowRankEdit:
        """The same update times ``factor`` (B scaled): a strength knob, 0 = no edit, 1 = as trained."""
        return LowRankEdit({t: (a, factor * b) for t, (a, b) in self.factors.items()}, self.n_layers, name=name,
                           meta={**self.meta, "scaled_by": factor * float(self.meta.get("scaled_by", 1.0))})

    # --- using it ---------------------------------------------------------------------------------
    def check_model(self, adapter: ModelAdapter) -> None:
        super().check_model(adapter)
        for target, (a, _) in self.factors.items():
            proj = projection(adapter, target)
            if proj.in_features != a.shape[1]:
                raise ModelError(f"edit {self.label}: {target} takes inputs of width {a.shape[1]}, this model's "
                                 f"projection takes {proj.in_features}")

    def hooks(self, model):
        adapter = as_adapter(model)
        self.check_model(adapter)
        return add_low_rank(adapter, self.factors)

    def _edit_weights(self, adapter: ModelAdapter, snapshot: WeightSnapshot) -> dict[str, Any]:
        from refusal_atlas.model.placement import is_offloaded

        if is_offloaded(adapter.model):
            raise ModelError("low-rank weight edits of a partly offloaded model are not supported; evaluate them "
                             "with hooks or place the model without offload")
        for target, (a, b) in self.factors.items():
            w = snapshot.keep(projection(adapter, target).weight)
            work = torch.promote_types(w.dtype, torch.float32)
            w.data.copy_((w.data.to(work) + b.to(w.device, work) @ a.to(w.device, work)).to(w.dtype))
        return {"rank": self.rank, "matrices": len(self.factors),
                "layers": sorted({layer for layer, _ in self.factors})}
