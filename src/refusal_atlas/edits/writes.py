"""The one linear map every ablation edit applies to residual writes, as hooks and as weight edits.

For unit directions u_1..u_k and a strength w, a write x (any d_model vector) becomes

* ``subspace``:   x − w·P x, P the orthogonal projector onto span(u_i) (w = 1: exact ablation);
* ``sequential``: (I − w u_k u_kᵀ)···(I − w u_1 u_1ᵀ) x, the SOM paper's order-dependent projections.

Both are linear, so applying the map to a Linear's output equals applying it to the columns of its
weight (and to its bias): ``W ← T W``, ``b ← T b``. That is why hooks on the out-projections and the
weight edit agree.

**Transforms** (abliterix 1.12's names, defined from grimjim's write-ups; see docs/edits.md): ``project``
is the map above; ``householder`` *reflects* instead of projecting, x − 2w·P x (w = 1: the Householder
reflection I − 2 u uᵀ, an isometry, so every write keeps its norm); ``biproject`` is the projection with
each block's directions first orthogonalized against the harmless mean of the residual that block writes
into (grimjim's "biprojected abliteration": the harmless direction of every edited layer is left alone).
The first two differ only in the factor :data:`REFLECTION` on the strength; the third only in the
directions (:class:`~refusal_atlas.edits.layerwise.LayerwiseAblation` orthogonalizes them), so every
transform keeps the hook form and its equality with the weight edit.

Computed in float32 (at least) through :func:`~refusal_atlas.edits.projection.project_out` and rounded
once to the model dtype.

Weight edits work in place, a slab of rows or columns at a time (:func:`map_in_place`): the float32
working copy of a whole matrix would be 2 GB for a 7B model's embedding (three of them at once in the
projection), which is what used to push an export of a 7B model past a 24 GB machine.
"""

from __future__ import annotations

from typing import Literal

import torch

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits.projection import AblationMode, orthonormal_basis, project_out

Transform = Literal["project", "householder", "biproject"]
TRANSFORMS: tuple[str, ...] = ("project", "householder", "biproject")
REFLECTION = {"project": 1.0, "householder": 2.0, "biproject": 1.0}  # x − factor·w·P x


def check_transform(transform: str) -> Transform:
    if transform not in TRANSFORMS:
        raise ConfigError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    return transform  # type: ignore[return-value]


def prepare(directions: torch.Tensor, mode: AblationMode) -> torch.Tensor:
    """[k, d] directions → what :func:`map_writes` needs: an orthonormal basis, or unit rows in order."""
    d = directions.to(torch.float64)
    if mode == "subspace":
        return orthonormal_basis(d).to(torch.float32)
    return (d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(torch.float32)


def map_writes(x: torch.Tensor, prepared: torch.Tensor, weight: float, mode: AblationMode) -> torch.Tensor:
    """Apply the write map (see the module docstring) along the last axis of ``x``; same dtype out."""
    work = torch.promote_types(x.dtype, torch.float32)
    out = x.to(work)
    bases = [prepared] if mode == "subspace" else [u.unsqueeze(0) for u in prepared]
    for basis in bases:
        projected = project_out(out, basis.to(out.device))
        out = projected if weight == 1.0 else out + weight * (projected - out)
    return out.to(x.dtype)


CHUNK_ELEMENTS = 1 << 22  # elements edited per step: 16 MB of float32 working copies, whatever the matrix


def map_in_place(t: torch.Tensor, d_axis: int, fn) -> None:
    """``t`` ← ``fn`` applied along its axis ``d_axis``, in place, one slab of the largest other axis at a time.

    ``fn`` maps a [..., d] tensor to a [..., d] tensor (any float dtype: the copy back rounds once to ``t``'s);
    every slice along the other axes is mapped independently, so slabs give the whole map's values.
    """
    d_axis %= t.ndim
    others = [a for a in range(t.ndim) if a != d_axis]
    if not others:
        t.copy_(fn(t))
        return
    axis = max(others, key=lambda a: t.shape[a])
    per_slice = t.numel() // max(1, t.shape[axis])
    step = max(1, CHUNK_ELEMENTS // max(1, per_slice))
    for start in range(0, t.shape[axis], step):
        view = t.narrow(axis, start, min(step, t.shape[axis] - start))
        view.copy_(fn(view.movedim(d_axis, -1)).movedim(-1, d_axis))


def write_norm_scale(weight: torch.Tensor, d_axis: int, prepared: torch.Tensor, strength: float,
                     mode: AblationMode) -> torch.Tensor:
    """Per write vector (every slice of ``weight`` along its d_model axis ``d_axis``): ‖v‖ / ‖T v‖, which
    restores each write vector's norm after the map. A Linear [d, n] gives [n] (one per input feature);
    fused experts [E, d, inter] or [E, inter, d] give [E, inter] (one per expert and input feature)."""
    w = weight.detach().to(torch.float32).movedim(d_axis, -1)
    mapped = map_writes(w, prepared, strength, mode)
    return (w.norm(dim=-1) / mapped.norm(dim=-1).clamp_min(1e-12)).to(torch.float32)


def _edit(weight: torch.Tensor, d_axis: int, bias: torch.Tensor | None, prepared: torch.Tensor, strength: float,
          mode: AblationMode, norm_preserving: bool) -> None:
    def vectors(v: torch.Tensor) -> torch.Tensor:  # [..., d]: write vectors
        v32 = v.to(torch.float32)
        mapped = map_writes(v32, prepared, strength, mode)
        if not norm_preserving:
            return mapped
        return mapped * (v32.norm(dim=-1) / mapped.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)

    map_in_place(weight.data, d_axis, vectors)
    if bias is not None:
        bias.data.copy_(map_writes(bias.data, prepared, strength, mode))


def edit_write(write, prepared: torch.Tensor, strength: float, mode: AblationMode,
               norm_preserving: bool = False) -> None:
    """In place: the write map on one :class:`~refusal_atlas.model.adapter.WriteWeight` (a dense down_proj,
    fused [E, d, inter] / transposed [E, inter, d] experts, a shared expert), along its d_model axis; with
    ``norm_preserving`` every write vector (one per expert and input feature) keeps its norm."""
    _edit(write.weight, write.d_axis, write.bias, prepared, strength, mode, norm_preserving)


def edit_linear(linear: torch.nn.Linear, prepared: torch.Tensor, strength: float, mode: AblationMode,
                norm_preserving: bool = False) -> None:
    """In place: ``W ← T W`` (columns rescaled to their old norms when ``norm_preserving``), ``b ← T b``."""
    _edit(linear.weight, 0, linear.bias, prepared, strength, mode, norm_preserving)
