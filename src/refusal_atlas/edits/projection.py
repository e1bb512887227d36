"""Projection math every ablation shares: direction matrices, orthonormal bases, projecting out.

For k directions ``subspace`` mode projects onto the orthogonal complement of their span (exact,
order-free); ``sequential`` mode applies k rank-1 projections one after another in the given order,
which is what the SOM paper's code does (inexact for correlated directions; offered to reproduce it).
Both work in float32 at least, whatever the model dtype: in bf16 the rounding of ``x @ b.T`` leaves
part of the direction in.
"""

from __future__ import annotations

from typing import Literal

import torch

from refusal_atlas.core.errors import ConfigError

AblationMode = Literal["subspace", "sequential"]


def check_mode(mode: str) -> AblationMode:
    if mode not in ("subspace", "sequential"):
        raise ConfigError(f"unknown ablation mode {mode!r}; choose 'subspace' or 'sequential'")
    return mode  # type: ignore[return-value]


def as_matrix(directions) -> torch.Tensor:
    """Accept a DirectionSet, a [d] vector or a [k, d] matrix → [k, d] tensor."""
    vectors = getattr(directions, "vectors", directions)
    if not isinstance(vectors, torch.Tensor):
        raise ConfigError(f"expected a tensor or DirectionSet, got {type(directions).__name__}")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ConfigError(f"directions must have shape [k, d] with k >= 1, got {tuple(vectors.shape)}")
    return vectors


def orthonormal_basis(directions: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal rows spanning the directions (QR in float64; near-dependent rows dropped)."""
    mat = as_matrix(directions)
    q, r = torch.linalg.qr(mat.to(torch.float64).T)
    keep = r.diagonal().abs() > tol * r.diagonal().abs().max().clamp_min(1e-30)
    return q[:, keep].T.to(mat.dtype)


def orthogonalize_against(r: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Unit rows of ``r`` minus their component along the unit ``mean`` (one [d] mean, or one per row), in
    float64: "projected" directions (grimjim), which leave the harmless mean's own direction alone."""
    g = mean.to(torch.float64)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r64 = r.to(torch.float64)
    out = r64 - (r64 * g).sum(-1, keepdim=True) * g
    return (out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(torch.float32)


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x minus its component in span(basis); ``basis`` rows must be orthonormal."""
    work = torch.promote_types(x.dtype, torch.float32)
    xw, b = x.to(work), basis.to(device=x.device, dtype=work)
    return (xw - (xw @ b.T) @ b).to(x.dtype)


def project_out_sequential(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Rank-1 projections applied in order (the SOM paper's multi-direction ablation)."""
    work = torch.promote_types(x.dtype, torch.float32)
    out = x.to(work)
    for d in directions:
        u = d.to(device=x.device, dtype=work)
        u = u / (u.norm() + 1e-8)
        out = out - (out @ u).unsqueeze(-1) * u
    return out.to(x.dtype)


def projector(directions, mode: AblationMode):
    """x ↦ x with ``directions`` projected out in ``mode`` (the hook form of an ablation)."""
    mat = as_matrix(directions)
    if check_mode(mode) == "subspace":
        basis = orthonormal_basis(mat)
        return lambda x: project_out(x, basis.to(x.device))
    return lambda x: project_out_sequential(x, mat.to(x.device))
