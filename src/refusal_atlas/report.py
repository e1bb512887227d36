"""HTML report of a run directory: tables and plots of whatever the run produced.

Sections appear only when their artifacts exist (selection.json, metrics.json, directions/*,
search.json, ...). Plots are PNG files under plots/ and embedded in the page as base64, so the
single report.html can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import torch

from refusal_atlas.analysis import plots
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.errors import ArtifactError
from refusal_atlas.io import load_tensors, read_json, write_text
from refusal_atlas.rundir import RunDir

log = logging.getLogger(__name__)

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>refusal-atlas report: {title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f0f0f0}}td:first-child,td:nth-child(2){{text-align:left}}img{{max-width:100%}}
.note{{color:#666;font-size:13px}}</style></head><body>
<h1>refusal-atlas report</h1><p class="note">{subtitle}</p>
<p class="note">Research output of dual-use software: measurements of how refusal is encoded. Rates are
measured on held-out prompts and carry 95% Wilson intervals.</p>
{sections}</body></html>"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
            return f"[{v[0]:.2f}, {v[1]:.2f}]"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _directions(run: RunDir) -> dict[str, DirectionSet]:
    found = {}
    for path in sorted((run.path / "directions").glob("*.safetensors")):
        if path.stem == "dim_candidates":
            continue
        try:
            found[path.stem] = DirectionSet.load(path)
        except ArtifactError as exc:
            log.warning("skipping %s: %s", path, exc)
    return found


def build_report(run_dir: str | Path) -> Path:
    """Write plots/*.png and report.html for a run directory; returns the report path."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    if not manifest:
        raise ArtifactError(f"{run.path} has no manifest.json; is it a run directory?")
    pdir = run.path / "plots"
    sections: list[str] = []

    metrics = run.metrics()
    if metrics:
        cols = ["dataset", "intervention", "judge", "n", "refusal_rate", "ci95", "kl", "k"]
        sections.append("<h2>Held-out results</h2>" + _table(metrics, cols)
                        + _img(plots.plot_metrics(metrics, pdir / "metrics.png")))

    if (run.path / "selection.json").exists():
        sel = read_json(run.path / "selection.json")
        scored = [c for c in sel["candidates"] if "refusal" in c]
        chosen = next((c for c in scored if sel.get("chosen") and c["layer"] == sel["chosen"]["layer"]
                       and c["position"] == sel["chosen"]["position"]), None)
        relaxed = sel.get("relaxed_filters") or []
        note = f"<p class='note'>Filters relaxed because no candidate passed them: {', '.join(relaxed)}</p>" if relaxed else ""
        sections.append("<h2>Direction selection (validation prompts)</h2>" + note
                        + _img(plots.plot_selection(scored, chosen, pdir / "selection.png")))

    cand_path = run.direction_path("dim_candidates")
    if cand_path.exists():
        tensors, meta = load_tensors(cand_path)
        last = tensors["vectors"][meta["positions"].index(-1)] if -1 in meta["positions"] else tensors["vectors"][-1]
        sections.append("<h2>DIM across layers</h2>"
                        + _img(plots.plot_layer_cosines(last, meta["layers"], pdir / "layer_cosines.png")))

    dirs = _directions(run)
    if dirs:
        rows = [{"name": name, "method": d.method, "k": len(d), "layer": d.layer,
                 "mean norm": float(d.norms.mean())} for name, d in dirs.items()]
        text = "<h2>Directions</h2>" + _table(rows, ["name", "method", "k", "layer", "mean norm"])
        same_width = {n: d.vectors for n, d in dirs.items() if d.d_model == next(iter(dirs.values())).d_model}
        if sum(len(v) for v in same_width.values()) >= 2:
            text += _img(plots.plot_direction_map(same_width, pdir / "direction_map.png"))
        for name, d in dirs.items():
            curves = {k: v for k, v in (d.meta.get("losses") or {}).items()
                      if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)}
            if curves:
                text += f"<h3>{html.escape(name)}: training</h3>" + _img(
                    plots.plot_losses(curves, pdir / f"losses_{name}.png", title=f"{name} losses per step"))
        sections.append(text)

    if (run.path / "search.json").exists():
        search = read_json(run.path / "search.json")
        trials = [t for t in search.get("trials", []) if "kl" in t and "refusal" in t]
        if trials:
            sections.append("<h2>Direction-subset search (validation prompts)</h2>" + _img(
                plots.plot_pareto(trials, search.get("pareto_front", []), pdir / "pareto.png")))

    model = manifest.get("model", {})
    subtitle = html.escape(f"model {model.get('name')} · {model.get('n_layers')} layers · created "
                           f"{manifest.get('created')} · status {manifest.get('status')}")
    page = _PAGE.format(title=html.escape(model.get("name", "")), subtitle=subtitle,
                        sections="\n".join(sections) or "<p>No artifacts yet.</p>")
    return write_text(run.path / "report.html", page)
