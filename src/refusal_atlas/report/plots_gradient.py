"""Plots of gradient-trained directions: training curves, cone samples, representational independence."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from refusal_atlas.report.artifacts import ConeDistribution, CrossAblation, TrainingRun  # noqa: E402
from refusal_atlas.report.plots import save_figure  # noqa: E402

AUX_KEYS = ("lr", "grad_norm")
_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _curve(ax, values: list[float], label: str, **style) -> None:
    """Per-step values; long noisy runs get a faint raw line under a moving average."""
    steps = np.arange(1, len(values) + 1)
    y = np.asarray(values, dtype=float)
    if len(y) <= 60:
        ax.plot(steps, y, label=label, **style)
        return
    w = max(2, len(y) // 25)
    smooth = np.convolve(np.nan_to_num(y), np.ones(w) / w, mode="valid")
    ax.plot(steps, y, alpha=0.25, lw=0.8, color=style.get("color"))
    ax.plot(steps[w - 1:], smooth, label=f"{label} (mean of {w})", **style)


def _scale(ax, values: list[float], min_span: float = 1.0) -> None:
    """Log axis when values are positive and span ≥ ``min_span``× (loss terms differ by orders of magnitude);
    symlog when signs mix; linear otherwise (a log axis over a narrow range only prints clutter)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    if min(finite) > 0:
        if max(finite) / min(finite) >= min_span:
            ax.set_yscale("log")
    elif min_span <= 1 and any(v != 0 for v in finite):
        ax.set_yscale("symlog", linthresh=max(1e-3, min(abs(v) for v in finite if v != 0)))


def _val(run: TrainingRun, key: str) -> tuple[list[float], list[float]]:
    pts = [(float(v["step"]), float(v[key])) for v in run.val_history if isinstance(v.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _loss_panel(ax, runs: list[TrainingRun]) -> None:
    multi, plotted = len(runs) > 1, []
    for i, run in enumerate(runs):
        keys = [k for k in run.history if k not in AUX_KEYS and run.history[k]]
        if multi:  # one colour per run; only the total and RepInd's own term, or the panel is unreadable
            keys = [k for k in ("loss", "independence") if k in keys]
        for j, key in enumerate(keys):
            color = _color(i) if multi else ("black" if key == "loss" else _color(j))
            label = f"{run.label}: {key}" if multi else key
            _curve(ax, run.history[key], label, color=color, lw=2 if key == "loss" else 1.2,
                   ls=":" if multi and key != "loss" else "-")
            plotted += run.history[key]
    _scale(ax, plotted)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted CE + KL terms, nats)", fontsize=8)
    ax.set_title("training loss per step" + (" (total and terms)" if not multi else ""), fontsize=10)
    if plotted:
        ax.legend(fontsize=7)


def _val_panel(ax, runs: list[TrainingRun]) -> None:
    multi = len(runs) > 1
    right = ax.twinx()
    handles = []
    for i, run in enumerate(runs):
        for key, style, axis, single_color in (("objective", "-", ax, "black"), ("refusal", "--", ax, _color(0)),
                                               ("kl", ":", right, _color(1)), ("independence", "-.", right, _color(2))):
            xs, ys = _val(run, key)
            if xs:
                label = (f"{run.label}" if key == "objective" else None) if multi else key + (
                    " (right)" if axis is right else "")
                handles += axis.plot(xs, ys, style, marker="o", ms=3, color=_color(i) if multi else single_color,
                                     label=label)
        xs, ys = _val(run, "objective")
        if run.best_step is not None and run.best_step in xs:
            y = ys[xs.index(run.best_step)]
            ax.axvline(run.best_step, color=_color(i) if multi else "#c0392b", ls=":", lw=1, alpha=0.7)
            handles += ax.plot([run.best_step], [y], "*", ms=13, color=_color(i) if multi else "#c0392b",
                               label=None if multi else f"best step {run.best_step}")
    ax.set_xlabel("step")
    if right.lines:
        _scale(right, [v for line in right.lines for v in line.get_ydata()], min_span=20)
        right.tick_params(labelsize=7)
    else:
        right.set_axis_off()
    ax.set_ylabel("refusal score / objective (↓)", fontsize=8)
    title = "validation (objective —, refusal – –, KL ··· right, ★ best)" if multi else "validation"
    ax.set_title(title, fontsize=10)
    labelled = [h for h in handles if h.get_label() and not h.get_label().startswith("_")]
    if labelled:  # below the panel: inside it would hide the best-step star
        ax.legend(handles=labelled, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
                  frameon=False)


def _aux_panels(ax_lr, ax_g, runs: list[TrainingRun]) -> None:
    for i, run in enumerate(runs):
        for ax, key in ((ax_lr, "lr"), (ax_g, "grad_norm")):
            if run.history.get(key):
                _curve(ax, run.history[key], key, color=_color(i) if len(runs) > 1 else "#555555", lw=1)
    for ax, key in ((ax_lr, "lr"), (ax_g, "grad_norm")):
        _scale(ax, [v for r in runs for v in r.history.get(key, [])], min_span=20)
        ax.set_title(key, fontsize=8)
        ax.set_ylabel({"lr": "learning rate", "grad_norm": "gradient norm"}[key], fontsize=7)
        ax.tick_params(labelsize=7)
    ax_lr.tick_params(labelbottom=False)
    ax_g.set_xlabel("step", fontsize=8)


def plot_training(runs: list[TrainingRun], path: Path, title: str) -> Path:
    """Training loss terms per step, validation scores with the kept (best) step, and lr / grad norm."""
    fig = plt.figure(figsize=(14, 4))
    gs = fig.add_gridspec(2, 3, width_ratios=[3, 3, 1.4], wspace=0.38, hspace=0.35)
    ax_loss = fig.add_subplot(gs[:, 0])
    _loss_panel(ax_loss, runs)
    _val_panel(fig.add_subplot(gs[:, 1], sharex=ax_loss), runs)
    ax_lr = fig.add_subplot(gs[0, 2], sharex=ax_loss)
    _aux_panels(ax_lr, fig.add_subplot(gs[1, 2], sharex=ax_loss), runs)
    if len(runs) == 1:
        stops = f"best step {runs[0].best_step}, stopped: {runs[0].stopped}"
    else:
        stops = "; ".join(f"{r.label}: best {r.best_step}, {r.stopped}" for r in runs[:4]) + (" …" if len(runs) > 4
                                                                                              else "")
    fig.suptitle(f"{title} — {stops}", fontsize=11, y=1.02)
    return save_figure(fig, path)


_GROUPS = (("samples", "cone samples"), ("basis", "basis vectors"), ("random", "random directions"))


def plot_cone_samples(dists: list[ConeDistribution], path: Path) -> Path:
    """Refusal score under ablation: cone samples vs basis vectors vs random directions, baseline as a line."""
    fig, axes = plt.subplots(1, len(dists), figsize=(max(5.0, 4.2 * len(dists)), 4), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, dist in zip(axes[0], dists):
        ticks = []
        for x, (attr, name) in enumerate(_GROUPS):
            vals = getattr(dist, attr)
            if not vals:
                continue
            if len(vals) >= 4:
                ax.boxplot(vals, positions=[x], widths=0.5, showfliers=False, medianprops={"color": "black"})
            ax.scatter(x + rng.uniform(-0.14, 0.14, len(vals)), vals, s=18, color=_color(x), alpha=0.85, zorder=3)
            ticks.append((x, f"{name}\n(n={len(vals)})"))
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=8)
        ax.set_xlim(-0.6, len(_GROUPS) - 0.4)
        if dist.baseline is not None:
            ax.axhline(dist.baseline, color="#c0392b", ls="--", lw=1.2, label=f"no ablation ({dist.baseline:.2f})")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(f"cone k={dist.k}\n{dist.label}" if dist.k is not None else dist.label, fontsize=9)
        ax.set_xlabel("ablated direction (n per group)", fontsize=8)
    axes[0][0].set_ylabel("mean refusal score under ablation\n(log-odds, ↓ less refusal)", fontsize=9)
    return save_figure(fig, path)


def plot_independence(curves: list[CrossAblation], path: Path, mark_layer: int | None = None) -> Path:
    """Per-layer cosine change under cross-ablation with DIM (0 everywhere = representationally independent)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    panels = (("dim_under_ablation", "DIM's expression when the direction is ablated"),
              ("direction_under_dim_ablation", "the direction's expression when DIM is ablated"))
    for ax, (attr, title) in zip(axes, panels):
        ax.axhline(0, color="#999999", lw=0.8)
        if mark_layer is not None:
            ax.axvline(mark_layer, color="#999999", ls=":", lw=1)
        for i, c in enumerate(curves):
            extra = [f"mean |Δ| {c.mean_abs_change:.3f}"] if c.mean_abs_change is not None else []
            extra += [f"cos {c.cos_with_dim:+.2f}"] if c.cos_with_dim is not None else []
            ax.plot(c.layers, getattr(c, attr), marker="o", ms=3, color=_color(i),
                    label=c.name + (f" ({', '.join(extra)})" if extra else ""))
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (block input)" + (f"; dotted: DIM's layer {mark_layer}" if mark_layer is not None
                                               else ""), fontsize=9)
    axes[0].set_ylabel("mean change of cos(x, ·) over prompts (unitless)", fontsize=9)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)
