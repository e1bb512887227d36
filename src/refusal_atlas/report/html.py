"""HTML report of a run directory: tables and plots of whatever the run produced.

Sections appear only when their artifacts exist (selection.json, metrics.json, directions/*,
search.json, ...). Plots are PNG files under plots/ and embedded in the page as base64, so the
single report.html can be mailed or archived on its own. Each section (and each plot inside the
bigger ones) is built under a guard: a malformed artifact is logged, noted on the page and skipped,
and the rest of the report is still written.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusal_atlas.report import artifacts, plots, plots_geometry, plots_gradient
from refusal_atlas.report.geometry import direction_rows
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ArtifactError, RefusalAtlasError
from refusal_atlas.core.io import load_tensors, read_json, write_text
from refusal_atlas.report.sections import (DEFINITIONS, comparison_section, concept_note, examples_section,
                                           provenance_section, table)
from refusal_atlas.core.rundir import RunDir, recorded_settings

log = logging.getLogger(__name__)

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>refusal-atlas report: {title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f0f0f0}}td:first-child,td:nth-child(2){{text-align:left}}img{{max-width:100%}}
.note{{color:#666;font-size:13px}}table.kv th{{text-align:left;vertical-align:top}}table.kv td{{text-align:left}}
td.ex{{text-align:left;vertical-align:top;max-width:320px;font-size:12px}}dl.defs dt{{font-weight:bold}}
dl.defs dd{{margin:0 0 .5em 1.5em;font-size:14px}}details summary{{cursor:pointer;color:#8a1c1c}}</style></head><body>
<h1>refusal-atlas report</h1><p class="note">{subtitle}</p>
<p class="note">Research output of dual-use software: measurements of how refusal is encoded. Rates are
measured on held-out prompts and carry 95% Wilson intervals.</p>
{sections}</body></html>"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _skipped(what: str, exc: Exception) -> str:
    if isinstance(exc, RefusalAtlasError):
        log.warning("report: skipping %s: %s", what, exc)
    else:  # not a known artifact problem: keep the traceback in the log, it may be a bug
        log.warning("report: skipping %s after an unexpected %s", what, type(exc).__name__, exc_info=True)
    plots.close_all()
    return (f"<p class='note'>Skipped {html.escape(what)} ({html.escape(type(exc).__name__)}: "
            f"{html.escape(str(exc))})</p>")


def _guarded(what: str, build: Callable[[], str]) -> str:
    """One section or plot; a malformed artifact costs only that part of the page, never the report."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - artifacts come from many producer versions
        return _skipped(what, exc)


def _directions(run: RunDir) -> tuple[dict[str, DirectionSet], str]:
    found, notes = {}, ""
    for path in sorted((run.path / "directions").glob("*.safetensors")):
        if path.stem == "dim_candidates":
            continue
        try:
            found[path.stem] = DirectionSet.load(path)
        except Exception as exc:  # noqa: BLE001 - NaN vectors raise ConfigError, bad files ArtifactError
            notes += _skipped(f"direction file {path.name}", exc)
    if "dim" in found:  # DIM first: every comparison is against it
        found = {"dim": found.pop("dim"), **found}
    return found, notes


def _metrics_section(metrics: list[dict[str, Any]], pdir: Path) -> str:
    rows = [r for r in metrics if "refusal_rate" in r or "kl" in r]
    if not rows:
        return ""
    cols = ["dataset", "intervention", "judge", "max_new_tokens", "n", "refusal_rate", "ci95"]
    if any("deflection_rate" in r for r in rows):  # judges that read meaning: deflection beside refusal, not in it
        cols += ["deflection_rate", "deflection_ci95", "kinds"]
    cols += ["kl", "k"]
    text = "<h2>Held-out results</h2>" + table(rows, cols)
    if any("refusal_rate" in r for r in rows):
        text += _guarded("held-out plot", lambda: _img(plots.plot_metrics(rows, pdir / "metrics.png")))
    return text


def _selection_section(run: RunDir, cfg: dict[str, Any], pdir: Path) -> str:
    sel = read_json(run.path / "selection.json")
    candidates = sel["candidates"]
    scored = [c for c in candidates if "refusal" in c]
    chosen = next((c for c in scored if sel.get("chosen") and c["layer"] == sel["chosen"]["layer"]
                   and c["position"] == sel["chosen"]["position"]), None)
    relaxed = sel.get("relaxed_filters") or []
    note = (f"<p class='note'>Filters relaxed because no candidate passed them: {html.escape(', '.join(relaxed))}. "
            "The chosen candidate is the lowest-scoring one that passes the remaining filters.</p>"
            if relaxed else "")
    counts: dict[str, int] = {}
    for c in candidates:
        counts[c.get("status", "?")] = counts.get(c.get("status", "?"), 0) + 1
    status = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    img = _img(plots.plot_selection(candidates, chosen, pdir / "selection.png", baseline=sel.get("baseline"),
                                    kl_threshold=cfg.get("kl_threshold"), induce_threshold=cfg.get("induce_threshold"),
                                    n_val=cfg.get("n_val")))
    return ("<h2>Direction selection (validation prompts)</h2>" + note
            + f"<p class='note'>Candidates by status: {html.escape(status)}. A candidate is filtered when its KL "
            "exceeds the threshold, when adding it does not raise the refusal score above the induce threshold, or "
            "when its layer is in the pruned last fraction of layers.</p>" + img)


def _dim_layers_section(run: RunDir, pdir: Path) -> str:
    tensors, meta = load_tensors(run.direction_path("dim_candidates"))
    position = -1 if -1 in meta["positions"] else meta["positions"][-1]
    last = tensors["vectors"][meta["positions"].index(position)]
    return ("<h2>DIM across layers</h2>"
            + _img(plots.plot_layer_cosines(last, meta["layers"], pdir / "layer_cosines.png", position)))


def _geometry_plots(dirs: dict[str, DirectionSet], pdir: Path) -> str:
    width = next(iter(dirs.values())).d_model
    same = {n: d for n, d in dirs.items() if d.d_model == width}
    labels, groups, rows = direction_rows({n: d.vectors for n, d in same.items()}, {n: d.ids for n, d in same.items()})
    if len(labels) < 2:
        return ""
    shown = "" if len(labels) == sum(len(d) for d in same.values()) else (
        " Large sets contribute only their first row.")
    return (f"<p class='note'>{len(labels)} directions of width {width}.{shown}</p>"
            + _img(plots_geometry.plot_cosine_heatmap(labels, groups, rows, pdir / "direction_cosines.png"))
            + _img(plots_geometry.plot_direction_map(labels, groups, rows, pdir / "direction_map.png")))


def _som_plot(name: str, d: DirectionSet, dim: DirectionSet | None, pdir: Path) -> str:
    grid = artifacts.som_grid(d, dim)
    if grid is None:
        return ""
    title = f"{name}: " + ("the chosen subset, outlined on its map" if grid.subset else "neurons")
    if dim is not None and dim.layer != d.layer:
        title += f" (SOM at layer {d.layer}, DIM at layer {dim.layer})"
    return (f"<h3>{html.escape(name)}: SOM grid</h3>"
            + _img(plots_geometry.plot_som_grid(grid, pdir / f"som_grid_{name}.png", title)))


def _directions_section(dirs: dict[str, DirectionSet], pdir: Path) -> str:
    rows = [{"name": name, "method": d.method, "k": len(d), "layer": d.layer,
             "mean norm": float(d.norms.mean())} for name, d in dirs.items()]
    text = "<h2>Directions</h2>" + table(rows, ["name", "method", "k", "layer", "mean norm"])
    text += _guarded("direction cosines", lambda: _geometry_plots(dirs, pdir))
    dim = dirs.get("dim")
    for name, d in dirs.items():
        text += _guarded(f"SOM grid of {name}", lambda: _som_plot(name, d, dim, pdir))
    return text


def _gradient_section(dirs: dict[str, DirectionSet], pdir: Path) -> str:
    dim, rows, plots_html, notes = dirs.get("dim"), [], "", ""
    for name, d in dirs.items():
        try:
            runs = artifacts.training_runs(d.meta)
            if not runs:
                continue
            rows.append(artifacts.gradient_row(name, d, runs, dim))
            plots_html += f"<h3>{html.escape(name)}: training</h3>" + _img(plots_gradient.plot_training(
                runs, pdir / f"training_{name}.png", f"{name} ({d.method}, k={len(d)})"))
        except Exception as exc:  # noqa: BLE001 - one bad training record must not hide the others
            notes += _skipped(f"training curves of {name}", exc)
    if not rows and not notes:
        return ""
    cols = ["name", "method", "k", "layer", "steps", "best_step", "stopped", "best val objective", "cos with DIM"]
    return ("<h2>Gradient-trained directions</h2><p class='note'>Validation objective = refusal score under "
            "ablation + KL weight × harmless KL (+ independence term for RepInd); lower is better. The saved "
            "direction is the one at the best step.</p>" + (table(rows, cols) if rows else "") + notes + plots_html)


def _records(metrics: list[dict[str, Any]], metric: str, reader: Callable[[dict[str, Any]], Any]) -> tuple[list, str]:
    """Parse every record of one metric; a malformed record is skipped with a note."""
    items, notes = [], ""
    for r in metrics:
        if r.get("metric") != metric:
            continue
        try:
            items.append(reader(r))
        except Exception as exc:  # noqa: BLE001 - same reason as _guarded
            notes += _skipped(f"{metric} record {r.get('intervention')!r}", exc)
    return items, notes


def _cone_section(metrics: list[dict[str, Any]], dirs: dict[str, DirectionSet], pdir: Path) -> str:
    # distributions saved with a cone basis (directions cone) read like the metrics records
    # (scripts/measure_gradient.py); <name> and <name>_k<k> hold the same cone, so keep each once
    saved = [{"metric": artifacts.DISTRIBUTION_METRIC, "intervention": f"{name} (held-out {ev.get('dataset')})",
              **ev} for name, d in dirs.items() if isinstance(ev := d.meta.get("sample_eval"), dict)]
    dists, notes = _records(metrics + saved, artifacts.DISTRIBUTION_METRIC, artifacts.cone_distribution)
    unique = {(d.k, tuple(d.samples)): d for d in dists}
    dists = list(unique.values())
    if not dists and not notes:
        return ""
    dists.sort(key=lambda d: (d.k is None, d.k or 0))
    img = _guarded("cone samples plot", lambda: _img(plots_gradient.plot_cone_samples(
        dists, pdir / "cone_samples.png"))) if dists else ""
    return ("<h2>Refusal cones: samples vs random directions</h2><p class='note'>Mean refusal score on held-out "
            "prompts when one direction is ablated: random points of the cone, its basis vectors, random unit "
            "directions; lower = less refusal.</p>" + notes + img)


def _independence_section(metrics: list[dict[str, Any]], dim: DirectionSet | None, pdir: Path) -> str:
    curves, notes = _records(metrics, artifacts.CROSS_ABLATION_METRIC, artifacts.cross_ablation)
    if not curves and not notes:
        return ""
    mark = dim.layer if dim is not None else None
    img = _guarded("independence plot", lambda: _img(plots_gradient.plot_independence(
        curves, pdir / "independence.png", mark))) if curves else ""
    return ("<h2>Representational independence from DIM</h2><p class='note'>Per layer, the mean change of the "
            "cosine between the last-token representation and one direction when the other is ablated; a "
            "representationally independent direction stays near 0 in both panels.</p>" + notes + img)


def _search_section(run: RunDir, pdir: Path) -> str:
    search = read_json(run.path / "search.json")
    trials = [t for t in search.get("trials", []) if "kl" in t and "refusal" in t]
    if not trials:
        return ""
    return "<h2>Direction-subset search (validation prompts)</h2>" + _img(
        plots.plot_pareto(trials, search.get("pareto_front", []), pdir / "pareto.png"))


def _edit_search_section(run: RunDir, pdir: Path) -> str:
    """`search edits`: its proxy front; with a capability task (three objectives), refusal vs KL coloured by
    the task loss, KL vs task loss, and the front's numbers."""
    search = read_json(run.path / "search_edits.json")
    trials = [t for t in search.get("trials", []) if "kl" in t and "refusal" in t]
    if not trials:
        return ""
    front = search.get("pareto_front", [])
    head = "<h2>Edit search (validation prompts)</h2>"
    if "task" not in search.get("objectives", {}):
        return head + _img(plots.plot_pareto(trials, front, pdir / "search_edits.png", what="edit search"))
    task = ((search.get("settings") or {}).get("objectives") or ["", "", "task"])[2]
    rows = [{"trial": t["number"], "refusal": t["refusal"], "KL": t["kl"], "task loss": t["task"],
             "accuracy": (t.get("capability") or {}).get("accuracy"),
             "picked": "yes" if t["number"] == (search.get("chosen") or {}).get("number") else ""}
            for t in search.get("pareto", [])]
    base = search.get("baseline") or {}
    note = (f"<p class='note'>Three objectives, all minimised: refusal and first-token KL as in every edit search, "
            f"and the capability task <b>{html.escape(str(task))}</b>: the increase of the mean negative "
            f"log-likelihood of the correct choice over the unedited model on {base.get('task_n', '?')} of the task's "
            f"validation items (unedited accuracy {base.get('task_accuracy', float('nan')):.3f}). Pick rule: "
            f"{html.escape((search.get('rule') or {}).get('description', ''))}</p>")
    img = _guarded("capability front plot", lambda: _img(plots.plot_capability_front(
        trials, front, pdir / "search_capability.png", str(task))))
    return head + note + img + table(rows, ["trial", "refusal", "KL", "task loss", "accuracy", "picked"])


def _metrics(run: RunDir) -> tuple[list[dict[str, Any]], str]:
    try:
        return [r for r in run.metrics() if isinstance(r, dict)], ""
    except Exception as exc:  # noqa: BLE001 - a corrupt metrics.json must not hide the directions
        return [], _skipped("metrics.json", exc)


def build_report(run_dir: str | Path) -> Path:
    """Write plots/*.png and report.html for a run directory; returns the report path."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    if not manifest:
        raise ArtifactError(f"{run.path} has no manifest.json; is it a run directory?")
    pdir = run.path / "plots"
    metrics, notes = _metrics(run)
    dirs, dir_notes = _directions(run)
    sections: list[str] = [notes + dir_notes, DEFINITIONS + concept_note(manifest)]
    sections.append(_guarded("run provenance", lambda: provenance_section(run, manifest, metrics)))
    sections.append(_guarded("held-out results", lambda: _metrics_section(metrics, pdir)))
    sections.append(_guarded("methods compared", lambda: comparison_section(run, metrics)))
    sections.append(_guarded("example completions", lambda: examples_section(run)))
    if (run.path / "selection.json").exists():
        sections.append(_guarded("direction selection", lambda: _selection_section(run, recorded_settings(manifest),
                                                                                    pdir)))
    if run.direction_path("dim_candidates").exists():
        sections.append(_guarded("DIM across layers", lambda: _dim_layers_section(run, pdir)))
    if dirs:
        sections.append(_guarded("directions", lambda: _directions_section(dirs, pdir)))
        sections.append(_guarded("gradient-trained directions", lambda: _gradient_section(dirs, pdir)))
    sections.append(_guarded("cone samples", lambda: _cone_section(metrics, dirs, pdir)))
    sections.append(_guarded("independence", lambda: _independence_section(metrics, dirs.get("dim"), pdir)))
    if (run.path / "search.json").exists():
        sections.append(_guarded("direction-subset search", lambda: _search_section(run, pdir)))
    if (run.path / "search_edits.json").exists():
        sections.append(_guarded("edit search", lambda: _edit_search_section(run, pdir)))

    model = manifest.get("model", {})
    subtitle = html.escape(f"model {model.get('name')} · {model.get('n_layers')} layers · created "
                           f"{manifest.get('created')} · status {manifest.get('status')}")
    page = _PAGE.format(title=html.escape(model.get("name", "")), subtitle=subtitle,
                        sections="\n".join(s for s in sections if s) or "<p>No artifacts yet.</p>")
    return write_text(run.path / "report.html", page)
