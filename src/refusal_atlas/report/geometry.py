"""Geometry metrics: cosine similarities and a 2-D map of directions.

Classical (Torgerson) MDS on cosine distances keeps the picture faithful to the angles between
directions, which is what ablation cares about; it needs only an eigendecomposition (no extra
dependency, deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise cosine similarities between the rows of ``a`` (and ``b``)."""
    a = torch.nn.functional.normalize(a.to(torch.float64), dim=-1)
    b = a if b is None else torch.nn.functional.normalize(b.to(torch.float64), dim=-1)
    return a @ b.T


def classical_mds(vectors: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Embed rows in ``dims`` dimensions so Euclidean distances approximate cosine distances."""
    n = vectors.shape[0]
    if n < 2:
        return torch.zeros(n, dims, dtype=torch.float64)
    d2 = (2.0 - 2.0 * cosine_matrix(vectors)).clamp_min(0.0)  # squared chord distance on the sphere
    centering = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram = -0.5 * centering @ d2 @ centering
    evals, evecs = torch.linalg.eigh(gram)
    order = evals.argsort(descending=True)[:dims]
    coords = evecs[:, order] * evals[order].clamp_min(0.0).sqrt()
    # fix the sign of each axis so the picture is deterministic
    signs = torch.sign(coords[coords.abs().argmax(dim=0), torch.arange(coords.shape[1])])
    return coords * torch.where(signs == 0, 1.0, signs)


def layer_cosines(candidates: torch.Tensor) -> torch.Tensor:
    """Cosine between DIM candidates of every pair of layers (candidates: [n_layers, d])."""
    return cosine_matrix(candidates)


def direction_rows(sets: Mapping[str, torch.Tensor], ids: Mapping[str, Sequence[int]] | None = None,
                   max_rows: int = 40) -> tuple[list[str], list[str], torch.Tensor]:
    """Rows worth comparing: every set's first row, plus all rows of multi-row sets while ≤ ``max_rows``.

    A 100-neuron SOM would drown a heatmap, so big sets contribute only their first (most-hit /
    best) row. Returns (labels like "som[3]", set name per row, stacked rows [n, d]).
    """
    take = {name: 1 for name in sets}
    total = len(sets)
    for name, vecs in sets.items():
        extra = len(vecs) - 1
        if extra and total + extra <= max_rows:
            take[name], total = len(vecs), total + extra
    labels, groups, rows = [], [], []
    for name, vecs in sets.items():
        row_ids = list(ids[name]) if ids and name in ids else list(range(len(vecs)))
        for r in range(take[name]):
            labels.append(name if len(vecs) == 1 else f"{name}[{row_ids[r]}]")
            groups.append(name)
            rows.append(vecs[r].to(torch.float64))
    return labels, groups, torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)
