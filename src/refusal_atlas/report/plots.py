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

from refusal_atlas.report.geometry import cosine_matrix  # noqa: E402

DPI = 160  # sharp on high-density screens and in print


def save_figure(fig, path: Path) -> Path:
    """Write via a temporary file so a crash never leaves a half-written PNG that the report embeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def close_all() -> None:
    """Drop figures a failed plot left open (the report goes on with the next section)."""
    plt.close("all")


# how each selection status is drawn: (marker, colour, legend text)
_STATUS_STYLE = {
    "ok": ("o", "#2c7bb6", "passed the filters"),
    "kl": ("x", "#d7191c", "filtered: KL > threshold"),
    "induce": ("v", "#fdae61", "filtered: cannot induce refusal"),
    "nan": ("s", "#555555", "filtered: NaN score"),
    "not_evaluated": (".", "#999999", "KL/induce not computed (ranked after the winner)"),
}


def _status_key(status: str | None) -> str:
    status = status or "not_evaluated"
    if status.startswith("ok"):
        return "ok"
    return status.removeprefix("filtered:") if status.startswith("filtered:") else "not_evaluated"


def plot_selection(candidates: list[dict], chosen: dict | None, path: Path, *, baseline: dict | None = None,
                   kl_threshold: float | None = None, induce_threshold: float | None = None,
                   n_val: int | None = None) -> Path:
    """Write :func:`selection_figure` to ``path``."""
    return save_figure(selection_figure(candidates, chosen, baseline=baseline, kl_threshold=kl_threshold,
                                        induce_threshold=induce_threshold, n_val=n_val), path)


def selection_figure(candidates: list[dict], chosen: dict | None, *, baseline: dict | None = None,
                     kl_threshold: float | None = None, induce_threshold: float | None = None,
                     n_val: int | None = None):
    """Ablation refusal score, KL and steering score per layer, with thresholds, baselines and filter marks.

    One line per position; each point's marker says whether the candidate passed the Arditi filters or
    why it was dropped, and pruned late layers (no scores) are shaded, so a chosen layer that does not
    have the lowest score is explained on the plot itself.
    """
    baseline = baseline or {}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [("refusal", "refusal score under ablation (lower is better)", "refusal score (log-odds)",
               baseline.get("harmful_refusal_score"), "baseline (harmful val, no edit)", None, None),
              ("kl", "KL on harmless val under ablation", "KL(base ‖ ablated), nats",
               None, None, kl_threshold, "KL threshold"),
              ("steering", "refusal score under ActAdd (higher is better)", "refusal score (log-odds)",
               baseline.get("harmless_refusal_score"), "baseline (harmless val, no edit)",
               induce_threshold, "induce threshold")]
    scored = [c for c in candidates if "refusal" in c]
    positions = sorted({c["position"] for c in scored})
    pruned = sorted({c["layer"] for c in candidates if c.get("status") == "filtered:late_layer"})
    seen: set[str] = set()
    for ax, (key, title, ylabel, base, base_label, thr, thr_label) in zip(axes, panels):
        for pos in positions:
            pts = sorted((c["layer"], c[key], _status_key(c.get("status"))) for c in scored
                         if c["position"] == pos and key in c)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, alpha=0.7, label=f"position {pos}")
            for layer, value, status in pts:
                marker, colour, text = _STATUS_STYLE.get(status, _STATUS_STYLE["not_evaluated"])
                ax.scatter([layer], [value], marker=marker, c=colour, s=28, zorder=4,
                           label=None if status in seen else text)
                seen.add(status)
        if base is not None:
            ax.axhline(base, ls="--", c="#444444", lw=1, label=base_label)
        if thr is not None:
            ax.axhline(thr, ls=":", c="#d7191c", lw=1.2, label=thr_label)
        if pruned:
            ax.axvspan(pruned[0] - 0.5, pruned[-1] + 0.5, color="#dddddd", zorder=0,
                       label=f"pruned late layers ≥ {pruned[0]} (not scored)")
        if chosen and key in chosen:
            ax.scatter([chosen["layer"]], [chosen[key]], s=160, facecolors="none", edgecolors="red", lw=1.5,
                       zorder=5, label=f"chosen: layer {chosen['layer']}, position {chosen['position']}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer (block input)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6.5, loc="best")
    n = f" (n = {n_val} harmful + {n_val} harmless validation prompts)" if n_val else ""
    fig.suptitle(f"Direction selection: {len(scored)} scored DIM candidates{n}", fontsize=11)
    fig.tight_layout()
    return fig


def plot_metrics(records: list[dict], path: Path) -> Path:
    """Refusal rate with 95% intervals for every (dataset, intervention) record; the no-edit rate dashed."""
    records = [r for r in records if "refusal_rate" in r and "dataset" in r]  # KL/score/cosine records have no bar
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.4 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = [r for r in records if r["dataset"] == ds and "refusal_rate" in r]
        ns = {r.get("n") for r in rows}
        same_n = len(ns) == 1  # else each bar says its own n (e.g. a 50-prompt probe next to the 100-prompt eval)
        labels = [f"{r['intervention']}\n[{r.get('judge', 'substring')}, {r.get('max_new_tokens', '?')} tok]"
                  + ("" if same_n else f" n={r.get('n')}") for r in rows]
        rates = [r["refusal_rate"] for r in rows]
        err = [[r["refusal_rate"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["refusal_rate"] for r in rows]]
        ax.bar(range(len(rows)), rates, yerr=err, capsize=4, color="#4a7bb7", label="refusal rate ± 95% Wilson CI")
        deflect = [r.get("deflection_rate") or 0.0 for r in rows]
        if any("deflection_rate" in r for r in rows):  # a judge that reads meaning: deflection on top, not in it
            ax.bar(range(len(rows)), deflect, bottom=rates, color="#f0c05a", hatch="//", edgecolor="#8a6d1f",
                   label="deflection (answers something else)")
        base = next((r["refusal_rate"] for r in rows if r["intervention"] == "none"), None)
        if base is not None:
            ax.axhline(base, ls="--", c="#444444", lw=1, label=f"baseline (no edit) {base:.2f}")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{ds} (n = {rows[0].get('n')} prompts)" if same_n else ds, fontsize=10)
        ax.set_ylabel("refusal rate (fraction of prompts)")
        ax.set_xlabel("intervention [judge, generation length]")
        ax.legend(fontsize=6.5, loc="upper right")
        for i, r in enumerate(rows):
            if r.get("kl") is not None:
                ax.text(i, min(0.93, r["ci95"][1] + 0.03), f"KL {r['kl']:.2f}", ha="center", fontsize=7)
    fig.suptitle("Held-out refusal rates (KL: next-token KL on harmless prompts, nats)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def masked_cosines(vectors: torch.Tensor):
    """Cosine matrix (numpy) with the rows and columns of zero vectors set to NaN: they have no direction."""
    import numpy as np

    cos = cosine_matrix(vectors).numpy().astype(float)
    zero = (vectors.double().norm(dim=-1) == 0).numpy()
    cos[zero, :] = np.nan
    cos[:, zero] = np.nan
    return cos


def plot_layer_cosines(vectors: torch.Tensor, layers: list[int], path: Path, position: int | None = None) -> Path:
    """Cosine similarity of DIM candidates across layers (how the refusal direction drifts).

    A zero vector (layer 0: the embeddings do not depend on the prompt's harmfulness at the
    template positions, so the means coincide) has no direction; it is masked, not drawn as cosine 0.
    """
    import numpy as np

    cos = masked_cosines(vectors)
    zero = np.isnan(cos).all(axis=1)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    im = ax.imshow(np.ma.masked_invalid(cos), cmap=cmap, vmin=-1, vmax=1)
    ticks = list(range(0, len(layers), max(1, len(layers) // 8)))
    ax.set_xticks(ticks, [layers[i] for i in ticks])
    ax.set_yticks(ticks, [layers[i] for i in ticks])
    ax.set_xlabel("layer (block input)")
    ax.set_ylabel("layer (block input)")
    masked = [layers[i] for i in range(len(layers)) if zero[i]]
    where = f" at position {position}" if position is not None else ""
    note = f"\ngrey: zero vector masked (layer {', '.join(map(str, masked))})" if masked else ""
    ax.set_title(f"cosine of DIM directions across {len(layers)} layers{where}{note}", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    return save_figure(fig, path)


def plot_pareto(trials: list[dict], front: list[int], path: Path, xkey: str = "kl", ykey: str = "refusal",
                what: str = "direction-subset search") -> Path:
    """Search trials in the damage–refusal plane with the Pareto front highlighted."""
    fig, ax = plt.subplots(figsize=(5.8, 4.3))
    xs = [t[xkey] for t in trials]
    ys = [t[ykey] for t in trials]
    ax.scatter(xs, ys, s=14, c="#999999", label="trials")
    pts = sorted((t[xkey], t[ykey]) for t in trials if t.get("number") in set(front))
    if pts:
        ax.plot(*zip(*pts), "-o", c="#c0392b", ms=4, label="Pareto front")
    xunit = "KL on harmless val, nats" if xkey == "kl" else xkey
    yunit = "refusal score on harmful val (log-odds)" if ykey == "refusal" else ykey
    ax.set_xlabel(f"{xunit} (lower is better)")
    ax.set_ylabel(f"{yunit} (lower is better)")
    ax.legend(fontsize=7)
    ax.set_title(f"{what}: n = {len(trials)} trials, {len(pts)} on the front", fontsize=10)
    return save_figure(fig, path)


def plot_capability_front(trials: list[dict], front: list[int], path: Path, task: str) -> Path:
    """A three-objective search: refusal against KL coloured by the task loss, and the task loss against KL;
    front trials (Pareto-optimal in all three) drawn with a black edge. Where the two panels disagree, KL and the
    task rank the edits' damage differently."""
    on = set(front)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.4), layout="constrained")  # colour bar and the right
    kl = [t["kl"] for t in trials]                                                   # panel's label must not meet
    loss = [t["task"] for t in trials]
    edge = ["black" if t.get("number") in on else "none" for t in trials]
    sc = left.scatter(kl, [t["refusal"] for t in trials], c=loss, cmap="viridis", s=26, edgecolors=edge,
                      linewidths=1.0)
    fig.colorbar(sc, ax=left, label=f"task loss, {task} (nats)")
    left.set_xlabel("KL on harmless val, nats (lower is better)")
    left.set_ylabel("refusal on harmful val (lower is better)")
    left.set_title("refusal vs KL, colour = task loss", fontsize=10)
    right.scatter(kl, loss, s=26, c=["#c0392b" if t.get("number") in on else "#999999" for t in trials])
    right.set_xlabel("KL on harmless val, nats (lower is better)")
    right.set_ylabel(f"task loss ({task}; increase of NLL, nats)")
    right.set_title(f"KL vs task loss: n = {len(trials)} trials, {len(on)} on the 3-D front (red)", fontsize=10)
    return save_figure(fig, path)
