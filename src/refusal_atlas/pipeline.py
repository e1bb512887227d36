"""The default end-to-end job: extract → DIM → select → held-out evaluation.

Each step reads and writes run-directory artifacts, so the CLI verbs (extract, directions dim,
select, evaluate) are these same functions run one at a time, and ``resume=True`` skips any
step whose artifact already exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from refusal_atlas.activations import ActivationSet, extract, load_activation_sets, save_activation_sets
from refusal_atlas.config import RunConfig
from refusal_atlas.data import Prompt
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import DimCandidates, difference_in_means
from refusal_atlas.directions.select import select_direction
from refusal_atlas.errors import ArtifactError, ConfigError
from refusal_atlas.evaluation.evaluate import evaluate_kl, evaluate_refusal
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.interventions import Intervention
from refusal_atlas.io import load_tensors, read_json, save_tensors, write_json
from refusal_atlas.workspace import PromptSets, Workspace, load_prompt_sets, open_workspace

log = logging.getLogger(__name__)


def filter_by_refusal(ws: Workspace, harmful: list[Prompt], harmless: list[Prompt]) -> tuple[list, list]:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (score < 0)."""
    def scores(prompts):
        lp = next_token_logprobs(ws.adapter, ws.chat, [p.instruction for p in prompts], ws.cfg.batch_size,
                                 desc="filter: baseline refusal scores")
        return refusal_score(lp, ws.refusal_ids)

    kept_harmful = [p for p, s in zip(harmful, scores(harmful)) if s > 0]
    kept_harmless = [p for p, s in zip(harmless, scores(harmless)) if s < 0]
    if len(kept_harmful) < 2 or len(kept_harmless) < 2:
        raise ConfigError(
            f"after filtering by the model's own refusal score only {len(kept_harmful)} harmful and "
            f"{len(kept_harmless)} harmless train prompts remain; use more prompts or filter_train=false"
        )
    return kept_harmful, kept_harmless


def extract_step(ws: Workspace, sets: PromptSets, resume: bool = False) -> dict[str, ActivationSet]:
    path = ws.run / "activations.safetensors"
    if resume and path.exists():
        return load_activation_sets(path)
    with ws.timed("extract"):
        harmful, harmless = sets.harmful_train, sets.harmless_train
        if ws.cfg.filter_train:
            harmful, harmless = filter_by_refusal(ws, harmful, harmless)
        acts = {
            name: extract(ws.adapter, ws.chat, [p.instruction for p in prompts], positions=None,
                          batch_size=ws.cfg.batch_size, desc=f"extract {name}")
            for name, prompts in (("harmful", harmful), ("harmless", harmless))
        }
        save_activation_sets(path, acts)
    return acts


def dim_step(ws: Workspace, acts: dict[str, ActivationSet]) -> DimCandidates:
    cands = difference_in_means(acts["harmful"], acts["harmless"])
    save_tensors(ws.run.direction_path("dim_candidates"), {"vectors": cands.vectors},
                 {"layers": cands.layers, "positions": cands.positions})
    return cands


def load_dim_candidates(ws: Workspace) -> DimCandidates:
    path = ws.run.direction_path("dim_candidates")
    if not path.exists():
        raise ArtifactError(f"no DIM candidates in {ws.run.path}; run `refusal-atlas directions dim` first")
    tensors, meta = load_tensors(path)
    return DimCandidates(tensors["vectors"], meta["layers"], meta["positions"])


def select_step(ws: Workspace, cands: DimCandidates, sets: PromptSets, resume: bool = False) -> DirectionSet:
    path = ws.run.direction_path("dim")
    if resume and path.exists():
        return DirectionSet.load(path)
    with ws.timed("select"):
        if ws.cfg.layer is not None:
            direction = cands.at(ws.cfg.layer, (ws.cfg.positions or [-1])[-1])
            direction.meta["selection"] = "fixed layer (--layer)"
        else:
            sel = select_direction(
                ws.adapter, ws.chat, cands, [p.instruction for p in sets.harmful_val],
                [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                kl_threshold=ws.cfg.kl_threshold, induce_threshold=ws.cfg.induce_threshold,
                prune_layer_frac=ws.cfg.prune_layer_frac, layers=ws.candidate_layers(),
                positions=ws.cfg.positions, batch_size=ws.cfg.batch_size, strict=ws.cfg.strict_filters)
            chosen = None if sel.direction is None else {"layer": sel.direction.layer,
                                                         "position": sel.direction.position}
            write_json(ws.run / "selection.json", {"chosen": chosen, "relaxed_filters": sel.relaxed,
                                                   "baseline": sel.baseline, "candidates": sel.scores})
            if sel.direction is None:
                raise ConfigError(_no_survivor_message(ws.cfg, sel.scores))
            if sel.relaxed:
                log.warning("no DIM candidate passed every filter; relaxed: %s (see selection.json)",
                            ", ".join(sel.relaxed))
            direction = sel.direction
        direction.save(path)
    return direction


def _no_survivor_message(cfg: RunConfig, scores: list[dict]) -> str:
    scored = [r for r in scores if "kl" in r]
    best_kl = min(scored, key=lambda r: r["kl"]) if scored else None
    best_steer = max(scored, key=lambda r: r["steering"]) if scored else None
    detail = "" if not scored else (
        f"; lowest KL {best_kl['kl']:.3f} (layer {best_kl['layer']}), highest steering "
        f"{best_steer['steering']:.2f} (layer {best_steer['layer']}); scores are in selection.json")
    return (f"no DIM candidate passed the filters (KL <= {cfg.kl_threshold}, steering >= "
            f"{cfg.induce_threshold}){detail}. Allow relaxation (strict_filters=false), change the thresholds, "
            "or use more validation prompts")


def evaluate_step(ws: Workspace, direction: DirectionSet, sets: PromptSets,
                  extra: list[Intervention] | None = None) -> list[dict]:
    """Baseline vs ablation on held-out harmful sets; baseline vs ablation vs ActAdd on harmless."""
    cfg, records = ws.cfg, []
    ablation = Intervention("ablate", direction, mode=cfg.ablation_mode)
    actadd = Intervention("actadd", direction, coeff=1.0)
    harmful_specs = [Intervention("none"), ablation, *(extra or [])]
    with ws.timed("evaluate"):
        for name, prompts in sets.eval_harmful.items():
            for spec in harmful_specs:
                records.append(_refusal(ws, prompts, name, spec))
        base_lp = None
        for spec in (Intervention("none"), ablation, actadd, *(extra or [])):
            rec = _refusal(ws, sets.eval_harmless, cfg.eval_harmless, spec)
            rec["kl"], base_lp = evaluate_kl(ws.adapter, ws.chat, sets.eval_harmless, spec, base_lp, cfg.batch_size)
            records.append(rec)
        ws.run.add_metrics(records)
    return records


def _refusal(ws: Workspace, prompts: list[Prompt], dataset: str, spec: Intervention) -> dict:
    return evaluate_refusal(ws.adapter, ws.chat, prompts, dataset, spec, max_new_tokens=ws.cfg.max_new_tokens,
                            batch_size=ws.cfg.batch_size, completions_path=ws.run.completions_path(dataset, spec.label),
                            backend=_backend(ws))


def _backend(ws: Workspace):
    """The run's generation engine (cfg.backend): None for HF with hooks."""
    if ws.cfg.backend == "hf":
        return None
    from refusal_atlas.generation_vllm import VllmBackend

    return VllmBackend.for_workspace(ws)


def run(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> tuple[Workspace, list[dict]]:
    """The default job. Returns the workspace and the metrics records it wrote."""
    sets = load_prompt_sets(cfg)  # bad dataset input fails here, before anything is created
    ws = open_workspace(cfg, run_dir)
    acts = extract_step(ws, sets, resume)
    cands = dim_step(ws, acts)
    direction = select_step(ws, cands, sets, resume)
    records = evaluate_step(ws, direction, sets)
    ws.run.update_manifest(status="complete", direction={"layer": direction.layer, "position": direction.position,
                                                          "norm": float(direction.norms[0])})
    from refusal_atlas.report import build_report

    build_report(ws.run.path)
    return ws, records


def format_table(records: list[dict]) -> str:
    """A small fixed-width table of metrics records."""
    header = f"{'dataset':<16} {'intervention':<26} {'n':>4} {'refusal':>8}  {'95% CI':<15} {'KL':>7}"
    lines = [header, "-" * len(header)]
    for r in records:
        kl = f"{r['kl']:.3f}" if r.get("kl") is not None else "-"
        ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        lines.append(f"{r['dataset']:<16} {r['intervention']:<26} {r['n']:>4} {r['refusal_rate']:>8.2f}  {ci:<15} {kl:>7}")
    return "\n".join(lines)


def config_from_run(run_dir: str | Path, overrides: dict | None = None) -> RunConfig:
    """The config stored in a run directory's manifest, with overrides applied."""
    from refusal_atlas.config import load_config

    manifest = read_json(Path(run_dir) / "manifest.json")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}  # unset flags keep the run's values
    return load_config(None, {**manifest.get("config", {}), **given})
