"""The SOM workflow on a run directory: SOM directions → subset search → held-out comparison with DIM.

Steps read and write run-directory artifacts (directions/som.safetensors, study.db, search.json,
directions/search_best.safetensors, metrics.json), so each CLI verb is one of these functions and
``run --method som`` chains them after the DIM pipeline. Data roles: SOM on the train
representations, the search on the validation prompts, the comparison on the held-out sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_atlas.model.activations import load_activation_sets
from refusal_atlas.data import Prompt
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.som import SomDirections
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.evaluation.evaluate import evaluate_kl, evaluate_refusal
from refusal_atlas.edits import DirectionalAblation, Edit, NoEdit
from refusal_atlas.core.io import read_json, write_json
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.search.subsets import SubsetSpace, run_trials, subset_identity, subset_settings
from refusal_atlas.search.study import completed, open_study, summarize
from refusal_atlas.search.storage import release_stale_trials, study_guard
from refusal_atlas.settings import SearchSettings, Settings
from refusal_atlas.workflows.workspace import PromptSets, Workspace, load_prompt_sets


# --- SOM directions --------------------------------------------------------------------------------
def default_som_layer(run: RunDir) -> int:
    """The layer of the selected DIM direction (our convention), so SOM and DIM are compared like for like."""
    path = run.direction_path("dim")
    if not path.exists():
        raise ConfigError(f"no --layer given and no DIM direction in {run.path} (directions/dim.safetensors); "
                          "pass --layer or run `refusal-atlas run` first")
    return DirectionSet.load(path).layer


def som_step(run: RunDir, builder: SomDirections, layer: int | None = None, resume: bool = False) -> DirectionSet:
    """Train the SOM on the run's harmful train representations → directions/som.safetensors."""
    path = run.direction_path("som")
    if resume and path.exists():
        return DirectionSet.load(path)
    acts = load_activation_sets(run / "activations.safetensors")
    if "harmful" not in acts or "harmless" not in acts:
        raise ArtifactError(f"{run / 'activations.safetensors'} lacks harmful/harmless representations")
    layer = default_som_layer(run) if layer is None else layer
    directions = builder.fit(acts["harmful"], acts["harmless"], layer)
    dim_path = run.direction_path("dim")
    if dim_path.exists():
        dim = DirectionSet.load(dim_path)
        if dim.layer == layer:
            cos = (directions.unit() @ dim.unit()[0]).tolist()
            directions.meta["cos_to_dim"] = [round(c, 6) for c in cos]
    directions.save(path)
    return directions


# --- search ----------------------------------------------------------------------------------------
def validation_objective(ws: Workspace, sets: PromptSets, mode: str) -> ValidationObjective:
    return ValidationObjective(ws.adapter, ws.chat, [p.instruction for p in sets.harmful_val],
                               [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                               batch_size=ws.settings.model.batch_size, mode=mode)  # type: ignore[arg-type]


def record_references(study, ws: Workspace, objective: ValidationObjective) -> None:
    """Store the unmodified model's scores and full DIM ablation's in the study, once."""
    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", objective.baseline())
    dim_path = ws.run.direction_path("dim")
    if "reference" not in study.user_attrs and dim_path.exists():
        values = objective(DirectionSet.load(dim_path))  # (refusal, KL[, task loss])
        study.set_user_attr("reference", {"dim": {"refusal": values[0], "kl": values[1],
                                                  **({"task": values[2]} if len(values) > 2 else {}),
                                                  "note": "DIM was selected on these same val prompts"}})


def search_step(ws: Workspace, sets: PromptSets, search: SearchSettings, *, trials: int | None = None,
                until: int | None = None, storage: str | None = None) -> dict[str, Any]:
    """Add ``trials`` trials (or run until ``until`` trials are complete) → study.db, search.json, search_best.

    What is searched: subsets of ``search.k`` (up to ``search.k_max``) of the directions in
    ``search.directions``, ablated in the run's ablation mode and picked by its ``kl_threshold``.
    ``storage``: a PostgreSQL URL shared by several workers (see search/storage.py); default ``R/study.db``.

    Returns the search summary (see :func:`refusal_atlas.search.study.summarize`).
    """
    if (trials is None) == (until is None):
        raise ConfigError("give exactly one of trials (add N) or until (reach N completed trials)")
    if (trials if trials is not None else until) < 0:  # type: ignore[operator]
        raise ConfigError("the number of trials must be >= 0")
    name = search.directions
    directions = DirectionSet.load(ws.run.direction_path(name))
    selection = ws.settings.selection
    seed, mode = ws.settings.data.seed if search.seed is None else search.seed, selection.ablation_mode
    space = SubsetSpace.of(directions, search.k, search.k_max)  # k against the number of directions, before any work
    objective = validation_objective(ws, sets, mode)
    db = storage or ws.run / "study.db"
    with study_guard(db):
        identity = subset_identity(space, directions, objective.fingerprint(), seed=seed, mode=mode,
                                   n_startup_trials=search.n_startup_trials)
        study = open_study(db, f"search-{name}", identity)
        stale = release_stale_trials(study, db)
        n_new = trials if trials is not None else max(0, until - len(completed(study)))  # type: ignore[operator]
        if n_new > 0:
            record_references(study, ws, objective)
            with ws.timed("search"):
                run_trials(study, directions, objective, space, seed=seed, mode=mode,
                           n_startup_trials=search.n_startup_trials, n_trials=n_new)
        recorded = subset_settings(search.k, search.k_max, seed=seed, mode=mode, kl_threshold=selection.kl_threshold,
                                   n_startup_trials=search.n_startup_trials)
        summary = summarize(study, selection.kl_threshold, recorded, mode)
    summary["directions"] = name
    summary["stale_trials_failed"] = stale
    chosen = directions.select(summary["chosen"]["ids"])
    chosen.meta = {**chosen.meta, "search": {"trial": summary["chosen"]["number"], "refusal": summary["chosen"]["refusal"],
                                             "kl": summary["chosen"]["kl"], "rule": summary["rule"]["name"]}}
    chosen.save(ws.run.direction_path("search_best"))
    write_json(ws.run / "search.json", summary)
    return summary


# --- held-out comparison ---------------------------------------------------------------------------
def _existing(records: list[dict], spec: Edit, dataset: str, n: int, max_new_tokens: int,
              need_kl: bool, judge: str = "substring") -> dict | None:
    for r in records:
        if (r.get("intervention"), r.get("fingerprint"), r.get("dataset"), r.get("judge"), r.get("n")) == (
                spec.label, spec.describe().get("fingerprint"), dataset, judge, n) \
                and r.get("max_new_tokens") == max_new_tokens and (not need_kl or r.get("kl") is not None):
            return r
    return None


def heldout_comparison(ws: Workspace, sets: PromptSets, chosen: DirectionSet, dim: DirectionSet) -> dict[str, Any]:
    """Baseline vs DIM vs the chosen subset on held-out harmful sets (refusal rate) and harmless (KL).

    Records already in metrics.json for the same dataset, n and max_new_tokens (the DIM pipeline's
    baseline and DIM ablation, same greedy decoding) are reused; new ones are added.
    """
    ev, mode, existing, new = ws.settings.evaluation, ws.settings.selection.ablation_mode, ws.run.metrics(), []
    ids = ",".join(str(i) for i in chosen.ids)
    specs = {"baseline": NoEdit(), "dim": DirectionalAblation.from_directions(dim, mode),
             "som": DirectionalAblation.from_directions(chosen, mode, label=f"ablate:{chosen.method}[{ids}]")}
    table: list[dict] = []

    def record(prompts: list[Prompt], dataset: str, spec: Edit, harmless: bool, base_lp):
        rec = _existing(existing, spec, dataset, len(prompts), ev.max_new_tokens, harmless, ev.judge)
        if rec is None:
            rec = evaluate_refusal(ws.adapter, ws.chat, prompts, dataset, spec, max_new_tokens=ev.max_new_tokens,
                                   batch_size=ev.generation_batch_size,
                                   completions_path=ws.run.completions_path(dataset, spec.label), judge=ws.judge())
            if harmless:
                rec["kl"], base_lp = evaluate_kl(ws.adapter, ws.chat, prompts, spec, base_lp,
                                                 ws.settings.model.batch_size)
            new.append(rec)
        table.append(rec)
        return rec, base_lp

    out: dict[str, Any] = {"direction_ids": list(chosen.ids), "k": len(chosen), "layer": chosen.layer,
                           "mode": mode, "datasets": {}}
    with ws.timed("evaluate_search"):
        for dataset, prompts in sets.eval_harmful.items():
            out["datasets"][dataset] = {name: record(prompts, dataset, spec, False, None)[0]["refusal_rate"]
                                        for name, spec in specs.items()}
            out["datasets"][dataset]["n"] = len(prompts)
        base_lp, harmless = None, {}
        for name, spec in specs.items():
            rec, base_lp = record(sets.eval_harmless, ev.eval_harmless, spec, True, base_lp)
            harmless[name] = {"refusal_rate": rec["refusal_rate"], "kl": rec["kl"]}
        out["harmless"] = {"dataset": ev.eval_harmless, **harmless}
        ws.run.add_metrics(new)
    out["winner"] = {d: _winner(v) for d, v in out["datasets"].items()}
    out["records"] = table
    return out


def _winner(rates: dict[str, float]) -> dict[str, Any]:
    """Lower held-out refusal rate = stronger suppression; a tie is a tie."""
    diff = rates["som"] - rates["dim"]
    name = "tie" if abs(diff) < 1e-12 else ("som" if diff < 0 else "dim")
    return {"method": name, "som_minus_dim_pp": round(100 * diff, 2)}


def compare_step(ws: Workspace, sets: PromptSets, chosen_name: str = "search_best") -> dict[str, Any]:
    chosen = DirectionSet.load(ws.run.direction_path(chosen_name))
    dim_path = ws.run.direction_path("dim")
    if not dim_path.exists():
        raise ArtifactError(f"no DIM direction in {ws.run.path} to compare with; run `refusal-atlas run` first")
    comparison = heldout_comparison(ws, sets, chosen, DirectionSet.load(dim_path))
    path = ws.run / "search.json"
    summary = read_json(path) if path.exists() else {}
    write_json(path, {**summary, "heldout": {k: v for k, v in comparison.items() if k != "records"}})
    return comparison


# --- formatting ------------------------------------------------------------------------------------
def format_search(summary: dict[str, Any]) -> str:
    c, base, ref = summary["chosen"], summary.get("baseline") or {}, (summary.get("reference") or {}).get("dim")
    lines = [f"trials: {summary['n_trials']}; Pareto front (validation; refusal score, KL):"]
    lines += [f"  #{t['number']:<4} ids {str(t['ids']):<16} refusal {t['refusal']:8.3f}  KL {t['kl']:.4f}"
              for t in summary["pareto"]]
    if base:
        lines.append(f"  no intervention: refusal {base['refusal']:.3f}")
    if ref:
        lines.append(f"  DIM (k=1):       refusal {ref['refusal']:.3f}  KL {ref['kl']:.4f}")
    lines.append(f"chosen: trial #{c['number']} ids {c['ids']} ({c['why']})")
    return "\n".join(lines)


def format_comparison(comparison: dict[str, Any]) -> str:
    from refusal_atlas.workflows.run import format_table

    lines = [format_table(comparison["records"]), ""]
    kl = comparison["harmless"]
    for dataset, w in comparison["winner"].items():
        r = comparison["datasets"][dataset]
        lines.append(f"{dataset}: refusal baseline {r['baseline']:.2f}, DIM {r['dim']:.2f}, SOM subset "
                     f"{comparison['direction_ids']} {r['som']:.2f} → winner {w['method']} "
                     f"({w['som_minus_dim_pp']:+.1f} pp SOM−DIM); KL on {kl['dataset']}: DIM {kl['dim']['kl']:.3f}, "
                     f"SOM {kl['som']['kl']:.3f}")
    return "\n".join(lines)


# --- end to end ------------------------------------------------------------------------------------
def run_som(settings: Settings, run_dir: str | Path, trials: int, *, builder: SomDirections | None = None,
            resume: bool = False, allow_low_refusal: bool = False) -> tuple[Workspace, dict[str, Any], dict[str, Any]]:
    """`run --method som`: the DIM pipeline, SOM directions (``builder``, default: the paper's map) at the DIM
    layer, a subset search of ``search.k`` directions to ``trials`` completed trials, the held-out comparison."""
    from refusal_atlas.workflows.run import run as run_dim
    from refusal_atlas.workflows.validate import check_at_least

    k = settings.search.k
    check_at_least(k=(k, 1), trials=(trials, 1))
    builder = builder or SomDirections(seed=settings.data.seed)
    rows, cols = builder.grid
    if k > rows * cols:  # before the DIM pipeline, not after it
        raise ConfigError(f"--k {k} is larger than the SOM grid ({rows}x{cols} = {rows * cols} neurons, fewer if "
                          f"some stay dead); use --k <= {rows * cols}")
    search = settings.search.model_copy(update={"directions": "som", "k_max": None, "seed": settings.data.seed})
    ws, _ = run_dim(settings, run_dir, resume=resume, allow_low_refusal=allow_low_refusal)
    ws.run.update_manifest(status="running")
    sets = load_prompt_sets(settings)
    with ws.timed("som"):
        som = som_step(ws.run, builder, layer=None, resume=resume)
    summary = search_step(ws, sets, search, until=trials)
    comparison = compare_step(ws, sets)
    ws.run.update_manifest(status="complete", som={"layer": som.layer, "n_directions": len(som),
                                                   "hits": som.meta.get("hits"), "chosen_ids": summary["chosen"]["ids"]})
    from refusal_atlas.report.html import build_report

    build_report(ws.run.path)  # again: the DIM pipeline's report predates the search
    return ws, summary, comparison
