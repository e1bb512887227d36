"""R/reproduce.json and R/reproduce.md (one table of claim rows, then the plots in R/plots).

The budget arrives as its JSON record (``ReproduceBudget.to_json()``): the report shows it and never needs the job.
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


def to_markdown(budget: dict[str, Any], rows: dict[str, dict], plots: dict[str, str]) -> str:
    lines = [f"# Reproduced claims (budget {budget['name']})", "",
             "Every number comes from held-out prompts; directions, subsets, k and edits were chosen on train and "
             "validation prompts only. Rates: greedy decoding, substring judge, Wilson 95% CI; means: bootstrap "
             "95% CI.", "",
             "| row | claim | measured | held-out prompts | n | numbers (95% CI) | verdict | rule |",
             "|---|---|---|---|---|---|---|---|"]
    for rid in sorted(rows):
        r = rows[rid]
        v = r["verdict"]
        n = ", ".join(f"{k} {v}" for k, v in r["n"].items()) if isinstance(r["n"], dict) else str(r["n"])
        cells = [f"({rid}) {TITLES[rid]}", r["claim"], r["measured"], r["prompts"], n,
                 numbers_text(r["numbers"]), f"**{v['verdict']}** — {v['detail']}", v["rule"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    missing = [r for r in TITLES if r not in rows]
    if missing:
        lines += ["", f"Not finished yet: rows {', '.join(missing)} (rerun the same command to continue)."]
    for rid, path in plots.items():
        lines += ["", f"## ({rid}) {TITLES[rid]}", "", f"![{TITLES[rid]}]({path})"]
    lines += ["", "Row times (s): " + ", ".join(f"({k}) {rows[k].get('seconds', '-')}" for k in sorted(rows))]
    return "\n".join(lines) + "\n"


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
            n = rows[rid]["n"]
            n_text = ", ".join(f"{k} {v}" for k, v in n.items()) if isinstance(n, dict) else f"{n} prompts"
            ax.set_title(f"({rid}) {TITLES[rid]}: held-out, n = {n_text}", fontsize=9)
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
    return out


def write_report(run_dir: Path, budget: dict[str, Any], rows: dict[str, dict]) -> dict[str, Any]:
    plots = make_plots(Path(run_dir), rows)
    data = {"budget": budget, "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "rows": {k: rows[k] for k in sorted(rows)}, "plots": plots}
    write_json(Path(run_dir) / "reproduce.json", data)
    write_text(Path(run_dir) / "reproduce.md", to_markdown(budget, rows, plots))
    return data
