"""R/reproduce.json and R/reproduce.md (one table of claim rows, then the plots in R/plots).

The budget arrives as its JSON record (``ReproduceBudget.to_json()``): the report shows it and never needs the job.
A row's ``caveats`` (how the DIM direction was selected, where a matched-KL comparison did not match) are printed
in its verdict cell, so the verdict is never read without them; the gradient methods' training curves (per-step
loss, validation objective) get a table and a plot, so a reader sees whether each direction left its start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from refusal_atlas.core.io import write_json, write_text

TITLES = {"a": "1-neuron SOM (1/t) = DIM", "b": "best SOM-k vs DIM", "c": "RDO vs DIM", "d": "refusal cones vs random",
          "e": "RepInd vs RDO⊥", "f": "SOM geometry vs refusal", "g": "searched edit vs DIM vs SOM-k"}


def _num(cell: Any) -> str:
    if not isinstance(cell, dict):
        return str(cell)
    value = cell.get("rate", cell.get("mean", cell.get("value", cell.get("r"))))
    if isinstance(value, list):
        text = " → ".join(f"{v:.3g}" for v in value)
    elif isinstance(value, (int, float)):
        text = f"{value:.3g}"
    else:
        return "-"
    ci = cell.get("ci95")
    if ci:
        text += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    if cell.get("n") is not None:
        text += f" n={cell['n']}"
    return text


def numbers_text(numbers: dict[str, Any]) -> str:
    parts = []
    for key, cell in numbers.items():
        if isinstance(cell, dict) and all(isinstance(v, dict) for v in cell.values()) and cell:
            parts += [f"{key} {k}: {_num(v)}" for k, v in cell.items()]
        elif isinstance(cell, list):
            parts.append(f"{key}: " + ", ".join(f"{v:.3g}" for v in cell))
        elif isinstance(cell, dict) and ("ids" in cell and "k" in cell):
            parts.append(f"{key}: k={cell['k']} ids {cell['ids']}")
        else:
            parts.append(f"{key}: {_num(cell)}")
    return "<br>".join(parts)


def n_text(n: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in n.items()) if isinstance(n, dict) else str(n)


def verdict_text(r: dict[str, Any]) -> str:
    v = r["verdict"]
    text = f"**{v['verdict']}** — {v['detail']}"
    if r.get("caveats"):
        text += "<br>" + "<br>".join(f"⚠ caveat: {c}" for c in r["caveats"])
    return text


def training_curves(rows: dict[str, dict]) -> dict[str, dict]:
    """Every trained direction's curve record, by name (rows (c), (d), (e) hold them)."""
    return {name: curve for rid in sorted(rows) for name, curve in rows[rid].get("training", {}).items()}


def training_table(curves: dict[str, dict]) -> list[str]:
    lines = ["| direction | steps run | kept step | training loss first → last | validation objective start → kept "
             "| \\|cos\\| with start | stopped |", "|---|---|---|---|---|---|---|"]
    for name, c in curves.items():
        loss = f"{c['loss'][0]:.3g} → {c['loss'][-1]:.3g}" if c["loss"] else "-"
        start, best = c.get("val_objective_start"), c.get("val_objective_best")
        val = f"{start:.3g} → {best:.3g}" if start is not None and best is not None else "-"
        cos = f"{c['cos_with_init']:.3f}" if c.get("cos_with_init") is not None else "-"
        lines.append(f"| {name} | {c['steps_run']} | {c['best_step']} | {loss} | {val} | {cos} | {c.get('stopped')} |")
    return lines


def to_markdown(budget: dict[str, Any], rows: dict[str, dict], plots: dict[str, str]) -> str:
    lines = [f"# Reproduced claims (budget {budget['name']})", "",
             "Every number comes from held-out prompts; directions, subsets, k, strengths and edits were chosen on "
             "train and validation prompts only. Rates: greedy decoding, substring judge, Wilson 95% CI; means: "
             "bootstrap 95% CI.", "",
             "| row | claim | measured | held-out prompts | n | numbers (95% CI) | verdict | rule |",
             "|---|---|---|---|---|---|---|---|"]
    for rid in sorted(rows):
        r = rows[rid]
        cells = [f"({rid}) {TITLES[rid]}", r["claim"], r["measured"], r["prompts"], n_text(r["n"]),
                 numbers_text(r["numbers"]), verdict_text(r), r["verdict"]["rule"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    missing = [r for r in TITLES if r not in rows]
    if missing:
        lines += ["", f"Not finished yet: rows {', '.join(missing)} (rerun the same command to continue)."]
    curves = training_curves(rows)
    if curves:
        lines += ["", "## Training of the gradient methods", "",
                  "Kept step 0 means the validated iterate is the initialisation itself.", "", *training_table(curves)]
    for key, path in plots.items():
        title = PLOT_TITLES.get(key, TITLES.get(key, key))
        lines += ["", f"## {title}", "", f"![{title}]({path})"]
    lines += ["", "Row times (s): " + ", ".join(f"({k}) {rows[k].get('seconds', '-')}" for k in sorted(rows))]
    return "\n".join(lines) + "\n"


PLOT_TITLES = {"b": "(b) held-out refusal score of the best validation subset per k (full strength)",
               "b_matched": "(b) SOM-k vs DIM at matched KL: validation sweeps and held-out matched points",
               "g": "(g) searched edit vs DIM vs SOM-k at matched KL", "d": "(d) refusal cones vs random directions",
               "e": "(e) cross-ablation cosine change with DIM per layer", "f": "(f) SOM geometry vs refusal",
               "training": "training loss and validation objective of every trained direction"}


def make_plots(run_dir: Path, rows: dict[str, dict]) -> dict[str, str]:
    """One PNG per row that has a curve; a failing plot never stops the report."""
    from refusal_atlas.report.plots import close_all, save_figure

    import matplotlib.pyplot as plt

    out: dict[str, str] = {}

    def plot(rid: str, draw) -> None:
        if rid not in rows:
            return
        try:
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            draw(ax, rows[rid])
            ax.set_title(f"({rid}) {TITLES[rid]}: held-out, n = {n_text(rows[rid]['n'])}", fontsize=9)
            handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]  # twin axes too
            ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
            save_figure(fig, run_dir / "plots" / f"reproduce_{rid}.png")
            out[rid] = f"plots/reproduce_{rid}.png"
        except Exception:  # noqa: BLE001 - a broken plot must not lose the table
            close_all()

    def curve_b(ax, r):
        for mode, curve in r["curves"].items():
            ax.plot([c["k"] for c in curve], [c["heldout_score"]["mean"] for c in curve], "o-", label=f"SOM-k ({mode})")
        ax.axhline(r["numbers"]["dim_heldout_score"]["mean"], color="k", ls="--", label="DIM")
        ax.set(xlabel="k (best validation subset)", ylabel="held-out refusal score (log-odds)")

    def cones_d(ax, r):
        for p in r["per_k"]:
            ax.scatter([p["k"]] * len(p["sample_scores"]), p["sample_scores"], s=12, label=f"cone k={p['k']}")
        ax.scatter([0] * len(r["numbers"]["random_scores"]), r["numbers"]["random_scores"], marker="x", c="grey",
                   label="random (x = 0)")
        ax.set(xlabel="cone dimension", ylabel="held-out refusal score (log-odds)")

    def layers_e(ax, r):
        for name in ("repind", "rdo_orth"):
            ax.plot(r["per_layer"]["layers"], r["per_layer"][name], label=name)
        ax.set(xlabel="layer", ylabel="mean |Δcos| with DIM")

    def geometry_f(ax, r):
        js = [p["ablated"] for p in r["points"]]
        ax.plot(js, [p["centroid_distance"] for p in r["points"]], "o-", label="centroid distance")
        ax.plot(js, [p["compactness"] for p in r["points"]], "s-", label="harmful compactness")
        ax2 = ax.twinx()
        ax2.plot(js, [p["refusal_score"]["mean"] for p in r["points"]], "k^--", label="refusal score")
        ax2.set_ylabel("refusal score (log-odds)")
        ax.set(xlabel="SOM directions ablated", ylabel="distance")

    for rid, draw in (("b", curve_b), ("d", cones_d), ("e", layers_e), ("f", geometry_f)):
        plot(rid, draw)
    b_matched = rows.get("b", {}).get("matched", {})
    g_matched = rows.get("g", {}).get("matched", {})
    for key, matched in (("b_matched", b_matched),
                         ("g", {k: v for k, v in {**g_matched, "dim": b_matched.get("dim"),
                                                  "som_sequential": b_matched.get("som_sequential")}.items()
                                if v is not None} if g_matched else None)):
        if matched:
            _guarded(out, key, run_dir, lambda path, m=matched: plot_matched(m, path))
    curves = training_curves(rows)
    if curves:
        _guarded(out, "training", run_dir, lambda path: plot_training(curves, path))
    return out


def _guarded(out: dict[str, str], key: str, run_dir: Path, draw) -> None:
    from refusal_atlas.report.plots import close_all

    try:
        draw(run_dir / "plots" / f"reproduce_{key}.png")
        out[key] = f"plots/reproduce_{key}.png"
    except Exception:  # noqa: BLE001 - a broken plot must not lose the table
        close_all()


def plot_matched(matched: dict[str, dict], path: Path) -> None:
    """Left: each method's validation sweep (validation KL vs validation refusal score, strengths marked), the
    target KL and the matched strengths. Right: held-out refusal rate vs held-out KL at the matched strengths,
    both with 95% intervals."""
    from refusal_atlas.report.plots import save_figure

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    target = next(iter(matched.values()))["target_kl"]
    for name, m in matched.items():
        pts = [p for p in m["sweep"] if p.get("val_score") is not None]
        line, = left.plot([p["val_kl"] for p in pts], [p["val_score"] for p in pts], "o-", ms=3, label=m["method"])
        for p in pts:
            left.annotate(f"{p['strength']:g}", (p["val_kl"], p["val_score"]), fontsize=6, color=line.get_color())
        left.axvline(m["val_kl"], color=line.get_color(), lw=0.6, ls=":")
        kl, rate = m["heldout_kl"], m["heldout_refusal"]
        right.errorbar([kl["mean"]], [rate["rate"]], xerr=[[kl["mean"] - kl["ci95"][0]], [kl["ci95"][1] - kl["mean"]]],
                       yerr=[[rate["rate"] - rate["ci95"][0]], [rate["ci95"][1] - rate["rate"]]], fmt="o", capsize=3,
                       color=line.get_color(), label=f"{m['method']} (s={m['strength']:.3g})")
    left.axvline(target, color="k", ls="--", lw=0.8, label=f"target KL {target:g}")
    left.set(xscale="log", xlabel="validation KL (harmless)", ylabel="validation refusal score (log-odds)",
             title="validation sweeps (labels: strength)")
    n = next(iter(matched.values()))["heldout_refusal"].get("n")
    right.set(xlabel="held-out KL (harmless_test)", ylabel="held-out refusal rate",
              title=f"held-out at the matched strengths (n = {n})")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    save_figure(fig, path)


def plot_training(curves: dict[str, dict], path: Path) -> None:
    """One panel per trained direction: training loss per step, validation objective at its steps (twin axis),
    the kept step marked."""
    from refusal_atlas.report.plots import save_figure

    import matplotlib.pyplot as plt

    n = len(curves)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (name, c) in zip(axes.ravel(), curves.items()):
        ax.plot(range(1, len(c["loss"]) + 1), c["loss"], "-", lw=1, label="training loss")
        ax.set(title=name, xlabel="step", ylabel="training loss")
        ax2 = ax.twinx()
        ax2.plot([v["step"] for v in c["validation"]], [v["objective"] for v in c["validation"]], "s--", color="C1",
                 ms=3, label="validation objective")
        ax2.axvline(c["best_step"], color="C2", lw=0.8, ls=":", label=f"kept step {c['best_step']}")
        ax2.set_ylabel("validation objective")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=6, loc="best")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def write_report(run_dir: Path, budget: dict[str, Any], rows: dict[str, dict]) -> dict[str, Any]:
    plots = make_plots(Path(run_dir), rows)
    data = {"budget": budget, "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "rows": {k: rows[k] for k in sorted(rows)}, "plots": plots}
    write_json(Path(run_dir) / "reproduce.json", data)
    write_text(Path(run_dir) / "reproduce.md", to_markdown(budget, rows, plots))
    return data
