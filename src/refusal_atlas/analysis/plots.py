"""Plots of a run directory's artifacts (matplotlib, Agg backend, PNG files).

Each function takes plain data and a destination path, so the report can call the ones whose
artifacts exist and tests can call them on synthetic data. Plots of gradient training and
measurements live in plots_gradient, direction geometry (SOM grid, cosines, MDS) in plots_geometry.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from refusal_atlas.analysis.geometry import cosine_matrix  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Write via a temporary file so a crash never leaves a half-written PNG that the report embeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def close_all() -> None:
    """Drop figures a failed plot left open (the report goes on with the next section)."""
    plt.close("all")


def plot_selection(candidates: list[dict], chosen: dict | None, path: Path) -> Path:
    """Ablation refusal score, KL and steering score per layer (one line per position)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("refusal", "refusal score under ablation (↓)"), ("kl", "KL on harmless (↓)"),
              ("steering", "refusal score under ActAdd (↑)")]
    positions = sorted({c["position"] for c in candidates})
    for ax, (key, title) in zip(axes, panels):
        for pos in positions:
            pts = sorted((c["layer"], c[key]) for c in candidates if c["position"] == pos and key in c)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"pos {pos}")
        if chosen and key in chosen:
            ax.scatter([chosen["layer"]], [chosen[key]], s=120, facecolors="none", edgecolors="red", zorder=5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer (block input)")
    if len(positions) > 1:
        axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_metrics(records: list[dict], path: Path) -> Path:
    """Refusal rate with 95% intervals for every (dataset, intervention) record."""
    records = [r for r in records if "refusal_rate" in r and "dataset" in r]  # KL/score/cosine records have no bar
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = [r for r in records if r["dataset"] == ds and "refusal_rate" in r]
        ns = {r.get("n") for r in rows}
        same_n = len(ns) == 1  # else each bar says its own n (e.g. a 50-prompt probe next to the 100-prompt eval)
        labels = [f"{r['intervention']}\n[{r.get('judge', 'substring')}]" + ("" if same_n else f" n={r.get('n')}")
                  for r in rows]
        rates = [r["refusal_rate"] for r in rows]
        err = [[r["refusal_rate"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["refusal_rate"] for r in rows]]
        ax.bar(range(len(rows)), rates, yerr=err, capsize=4, color="#4a7bb7")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{ds} (n={rows[0].get('n')})" if same_n else ds, fontsize=10)
        ax.set_ylabel("refusal rate")
        for i, r in enumerate(rows):
            if r.get("kl") is not None:
                ax.text(i, min(0.93, r["ci95"][1] + 0.03), f"KL {r['kl']:.2f}", ha="center", fontsize=7)
    return save_figure(fig, path)


def plot_layer_cosines(vectors: torch.Tensor, layers: list[int], path: Path) -> Path:
    """Cosine similarity of DIM candidates across layers (how the refusal direction drifts)."""
    cos = cosine_matrix(vectors).numpy()
    fig, ax = plt.subplots(figsize=(5, 4.3))
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    ticks = list(range(0, len(layers), max(1, len(layers) // 8)))
    ax.set_xticks(ticks, [layers[i] for i in ticks])
    ax.set_yticks(ticks, [layers[i] for i in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("cosine of DIM directions across layers", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def plot_pareto(trials: list[dict], front: list[int], path: Path, xkey: str = "kl", ykey: str = "refusal") -> Path:
    """Search trials in the damage–refusal plane with the Pareto front highlighted."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [t[xkey] for t in trials]
    ys = [t[ykey] for t in trials]
    ax.scatter(xs, ys, s=14, c="#999999", label="trials")
    pts = sorted((t[xkey], t[ykey]) for t in trials if t.get("number") in set(front))
    if pts:
        ax.plot(*zip(*pts), "-o", c="#c0392b", ms=4, label="Pareto front")
    ax.set_xlabel(f"{xkey} (harmless, ↓)")
    ax.set_ylabel(f"{ykey} (harmful val, ↓)")
    ax.legend(fontsize=7)
    ax.set_title("direction-subset search", fontsize=10)
    return save_figure(fig, path)
