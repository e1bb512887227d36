"""Plots of direction geometry: the SOM's neuron grid, pairwise cosines and an MDS map."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import RegularPolygon  # noqa: E402

from refusal_atlas.report.artifacts import SomGrid  # noqa: E402
from refusal_atlas.report.geometry import classical_mds, cosine_matrix  # noqa: E402
from refusal_atlas.report.plots import save_figure  # noqa: E402

_DROPPED = "#e3e3e3"  # no harmful prompt won this neuron: it yields no direction
_UNKNOWN = "#fafafa"  # live neuron whose cosine with DIM is not known (subset without cos_to_dim)


def som_centers(coord: tuple[int, int], shape: tuple[int, int], topology: str) -> tuple[float, float]:
    """Where MiniSom puts neuron (i, j): hexagonal rows ny-1, ny-3, ... shift left by ½, rows √3/2 apart."""
    i, j = coord
    if topology != "hexagonal":
        return float(i), float(j)
    return i - 0.5 * ((shape[1] - 1 - j) % 2 == 0), j * math.sqrt(3) / 2


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot_som_grid(grid: SomGrid, path: Path, title: str) -> Path:
    """Neurons on their (hex) grid, coloured by cosine with DIM (or by hits without DIM); dropped ones grey.

    A subset (e.g. the search's pick) is drawn on its whole map with the chosen neurons outlined.
    """
    nx, ny = grid.shape
    cos = [c.cos for c in grid.cells if c.cos is not None]
    if cos:
        lo, hi = min(cos), max(cos)
        pad = max(0.02, 0.05 * (hi - lo))
        norm, cmap, label = Normalize(lo - pad, hi + pad), plt.get_cmap("viridis"), "cosine with DIM"
    else:
        norm = Normalize(0, max([c.hits for c in grid.cells] + [1]))
        cmap, label = plt.get_cmap("Blues"), "hits (harmful train prompts)"
    fig, ax = plt.subplots(figsize=(min(12.0, 1.15 * nx + 2.2), min(10.0, 1.0 * ny + 1.2)))
    hexagonal = grid.topology == "hexagonal"
    for cell in grid.cells:
        x, y = som_centers(cell.coord, grid.shape, grid.topology)
        value = cell.cos if cos else cell.hits
        face = _DROPPED if cell.id is None else _UNKNOWN if value is None else cmap(norm(value))
        outlined = grid.subset and cell.in_set
        edge = "#c0392b" if outlined else "#bbbbbb" if face == _UNKNOWN else "white"
        ax.add_patch(RegularPolygon((x, y), 6 if hexagonal else 4, radius=1 / math.sqrt(3) if hexagonal else 0.7,
                                    orientation=0 if hexagonal else math.pi / 4, facecolor=face,
                                    alpha=0.45 if grid.subset and not cell.in_set else 1.0, edgecolor=edge,
                                    lw=3 if outlined else 1, hatch="//" if cell.id is None else None))
        if cell.id is None:
            ax.text(x, y, "dropped\n0 hits", ha="center", va="center", fontsize=7, color="#777777")
        else:
            cos_txt = "" if cell.cos is None else f"\ncos {cell.cos:.2f}"
            hits = f"{cell.hits} hit{'' if cell.hits == 1 else 's'}"
            ax.text(x, y, f"#{cell.id}\n{hits}{cos_txt}", ha="center", va="center", fontsize=7,
                    color=_text_color(face) if isinstance(face, tuple) else "black")
    xs = [som_centers(c.coord, grid.shape, grid.topology)[0] for c in grid.cells]
    ys = [som_centers(c.coord, grid.shape, grid.topology)[1] for c in grid.cells]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8, label=label)
    n_live = sum(c.id is not None for c in grid.cells)
    qe = "" if grid.quantization_error is None else f", quantization error {grid.quantization_error:.2f}"
    ax.set_title(f"{title}\n{nx}×{ny} {grid.topology} grid: {n_live} live, {len(grid.cells) - n_live} dropped{qe}",
                 fontsize=10)
    return save_figure(fig, path)


def _group_edges(groups: list[str]) -> list[float]:
    return [i - 0.5 for i in range(1, len(groups)) if groups[i] != groups[i - 1]]


def plot_cosine_heatmap(labels: list[str], groups: list[str], rows: torch.Tensor, path: Path) -> Path:
    """Pairwise cosines between directions (values written in the cells when they fit), sets separated."""
    cos = cosine_matrix(rows).numpy()
    n = len(labels)
    side = min(12.0, 3.0 + 0.36 * n)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    font = 8 if n <= 16 else 6
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    for edge in _group_edges(groups):
        ax.axhline(edge, color="black", lw=0.8)
        ax.axvline(edge, color="black", lw=0.8)
    if n <= 20:
        for (i, j), v in np.ndenumerate(cos):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6 if n > 12 else 7,
                    color="white" if abs(v) > 0.6 else "black")
    ax.set_title(f"cosine similarity between directions (n = {n})", fontsize=10)
    ax.set_xlabel("direction (set:id)")
    ax.set_ylabel("direction (set:id)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    return save_figure(fig, path)


def plot_direction_map(labels: list[str], groups: list[str], rows: torch.Tensor, path: Path) -> Path:
    """2-D classical MDS of the directions (distances ≈ cosine distances), coloured by set."""
    coords = classical_mds(rows).numpy()
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    markers = "os^Dv<>P"
    for g, name in enumerate(dict.fromkeys(groups)):  # later sets smaller, so a subset stays visible as a ring
        idx = [i for i, grp in enumerate(groups) if grp == name]
        ax.scatter(coords[idx, 0], coords[idx, 1], label=name, s=max(14.0, 90 / (1 + 0.6 * g)),
                   marker=markers[g % len(markers)], alpha=0.9)
    if len(labels) <= 40:
        for (x, y), label in zip(coords, labels):
            ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, color="#444444")
    ax.legend(fontsize=7)
    ax.set_xlabel("MDS axis 1 (cosine distance, unitless)")
    ax.set_ylabel("MDS axis 2 (cosine distance, unitless)")
    ax.set_title(f"MDS map of {len(labels)} directions (distances ≈ cosine distances)", fontsize=10)
    return save_figure(fig, path)
