"""The default end-to-end job: extract → DIM → select → held-out evaluation.

Each step reads and writes run-directory artifacts, so the CLI verbs (extract, directions dim,
select) are these same steps run one at a time (:func:`extract`, :func:`dim`, :func:`select`), and
``resume=True`` skips any step whose artifact already exists. :func:`build_direction` runs the steps up to
the selected direction, for jobs that go on from there (``run --method som``, reproduce, benchmarks).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from refusal_atlas.model.activations import ActivationSet, extract_resumable, load_activation_sets, save_activation_sets
from refusal_atlas.data import Prompt
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import DimCandidates, difference_in_means
from refusal_atlas.directions.select import select_direction
from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.evaluation.evaluate import evaluate_kl, evaluate_refusal
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.model.generation import DECODING
from refusal_atlas.edits import ActAdd, DirectionalAblation, Edit, NoEdit
from refusal_atlas.core.io import load_tensors, save_tensors, write_json
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.settings import SelectionSettings, Settings
from refusal_atlas.workflows.workspace import PromptSets, Workspace, load_prompt_sets, open_workspace

log = logging.getLogger(__name__)


LOW_REFUSAL = 0.10  # below this baseline refusal rate on harmful train prompts there is little to map


def train_refusal_scores(ws: Workspace, prompts: list[Prompt]) -> list[float]:
    """The model's own logit refusal score per prompt (> 0: it would start a refusal)."""
    lp = next_token_logprobs(ws.adapter, ws.chat, [p.instruction for p in prompts], ws.settings.model.batch_size,
                             desc="filter: baseline refusal scores")
    return [float(s) for s in refusal_score(lp, ws.refusal_ids)]


def filter_by_refusal(ws: Workspace, harmful: list[Prompt], harmless: list[Prompt],
                      harmful_scores: list[float] | None = None) -> tuple[list, list]:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (score < 0)."""
    if harmful_scores is None:
        harmful_scores = train_refusal_scores(ws, harmful)
    kept_harmful = [p for p, s in zip(harmful, harmful_scores) if s > 0]
    kept_harmless = [p for p, s in zip(harmless, train_refusal_scores(ws, harmless)) if s < 0]
    if len(kept_harmful) < 2 or len(kept_harmless) < 2:
        raise ConfigError(
            f"after filtering by the model's own refusal score only {len(kept_harmful)} harmful and "
            f"{len(kept_harmless)} harmless train prompts remain; use more prompts or filter_train=false"
        )
    return kept_harmful, kept_harmless


def check_baseline_refusal(ws: Workspace, scores: list[float], allow_low: bool = False) -> dict:
    """Stop (or, when allowed, warn) if the model almost never refuses the harmful train prompts.

    The measurement is recorded in the manifest (``baseline_refusal``) either way, so the report
    and a later reader see the rate the run was made with.
    """
    refused = sum(s > 0 for s in scores)
    rate = refused / len(scores)
    info = {"rate": rate, "refused": refused, "n": len(scores), "threshold": LOW_REFUSAL,
            "measure": "logit refusal score > 0 on the harmful train prompts", "allowed_low": allow_low}
    if rate < LOW_REFUSAL:
        msg = (f"the model refuses only {rate:.1%} ({refused} of {len(scores)}) of the harmful train prompts "
               f"(logit refusal score > 0), below {LOW_REFUSAL:.0%}: there is little refusal to map or remove")
        if not allow_low:
            ws.run.update_manifest(status="stopped: low baseline refusal", baseline_refusal=info)
            raise ConfigError(msg + "; pass --allow-low-refusal to continue anyway")
        log.warning("%s; continuing (--allow-low-refusal)", msg)
        info["warning"] = msg
    ws.run.update_manifest(baseline_refusal=info)
    return info


def extract_step(ws: Workspace, sets: PromptSets, resume: bool = False,
                 allow_low_refusal: bool = False) -> dict[str, ActivationSet]:
    """Filter the train prompts by the model's own refusal (after a baseline check), then extract.

    With ``filter_train=false`` no refusal scores are computed and the baseline is not checked.
    """
    path = ws.run / "activations.safetensors"
    if resume and path.exists():
        return load_activation_sets(path)
    with ws.timed("extract"):
        harmful, harmless = sets.harmful_train, sets.harmless_train
        if ws.settings.data.filter_train:
            scores = train_refusal_scores(ws, harmful)
            check_baseline_refusal(ws, scores, allow_low_refusal)
            harmful, harmless = filter_by_refusal(ws, harmful, harmless, scores)
        ws.run.update_manifest(train_counts={"harmful": {"sampled": len(sets.harmful_train), "kept": len(harmful)},
                                             "harmless": {"sampled": len(sets.harmless_train), "kept": len(harmless)}})
        acts = {  # each set is kept in R/partial/ until both are saved, so a crash loses at most one
            name: extract_resumable(ws.adapter, ws.chat, [p.instruction for p in prompts], ws.run / "partial" /
                                    f"activations.{name}.safetensors", positions=None,
                                    batch_size=ws.settings.model.batch_size, desc=f"extract {name}")
            for name, prompts in (("harmful", harmful), ("harmless", harmless))
        }
        save_activation_sets(path, acts)
        shutil.rmtree(ws.run / "partial", ignore_errors=True)
    return acts


def dim_step(run: RunDir, acts: dict[str, ActivationSet]) -> DimCandidates:
    """Difference-in-means candidates for every (position, layer) → directions/dim_candidates.safetensors."""
    cands = difference_in_means(acts["harmful"], acts["harmless"])
    save_tensors(run.direction_path("dim_candidates"), {"vectors": cands.vectors},
                 {"layers": cands.layers, "positions": cands.positions})
    return cands


def load_dim_candidates(run: RunDir) -> DimCandidates:
    path = run.direction_path("dim_candidates")
    if not path.exists():
        raise ArtifactError(f"no DIM candidates in {run.path}; run `refusal-atlas directions dim` first")
    tensors, meta = load_tensors(path)
    return DimCandidates(tensors["vectors"], meta["layers"], meta["positions"])


def select_step(ws: Workspace, cands: DimCandidates, sets: PromptSets, resume: bool = False) -> DirectionSet:
    path = ws.run.direction_path("dim")
    if resume and path.exists():
        return DirectionSet.load(path)
    selection = ws.settings.selection
    with ws.timed("select"):
        if selection.layer is not None:
            direction = cands.at(layer=selection.layer, position=(selection.positions or [-1])[-1])
            direction.meta["selection"] = "fixed layer (--layer)"
        else:
            sel = select_direction(
                ws.adapter, ws.chat, cands, [p.instruction for p in sets.harmful_val],
                [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                kl_threshold=selection.kl_threshold, induce_threshold=selection.induce_threshold,
                prune_layer_frac=selection.prune_layer_frac, layers=ws.candidate_layers(),
                positions=selection.positions, batch_size=ws.settings.model.batch_size,
                strict=selection.strict_filters, checkpoint=ws.run / "selection_progress.json")
            chosen = None if sel.direction is None else {"layer": sel.direction.layer,
                                                         "position": sel.direction.position}
            write_json(ws.run / "selection.json", {"chosen": chosen, "relaxed_filters": sel.relaxed,
                                                   "baseline": sel.baseline, "candidates": sel.scores})
            if sel.direction is None:
                raise ConfigError(_no_survivor_message(selection, sel.scores))
            if sel.relaxed:
                log.warning("no DIM candidate passed every filter; relaxed: %s (see selection.json)",
                            ", ".join(sel.relaxed))
            direction = sel.direction
        direction.save(path)
    return direction


def _no_survivor_message(selection: SelectionSettings, scores: list[dict]) -> str:
    scored = [r for r in scores if "kl" in r]
    best_kl = min(scored, key=lambda r: r["kl"]) if scored else None
    best_steer = max(scored, key=lambda r: r["steering"]) if scored else None
    detail = "" if not scored else (
        f"; lowest KL {best_kl['kl']:.3f} (layer {best_kl['layer']}), highest steering "
        f"{best_steer['steering']:.2f} (layer {best_steer['layer']}); scores are in selection.json")
    return (f"no DIM candidate passed the filters (KL <= {selection.kl_threshold}, steering >= "
            f"{selection.induce_threshold}){detail}. Allow relaxation (strict_filters=false), change the thresholds, "
            "or use more validation prompts")


def evaluate_step(ws: Workspace, direction: DirectionSet, sets: PromptSets,
                  extra: list[Edit] | None = None) -> list[dict]:
    """Baseline vs ablation on held-out harmful sets; baseline vs ablation vs ActAdd on harmless."""
    ev, records = ws.settings.evaluation, []
    ablation = DirectionalAblation.from_directions(direction, ws.settings.selection.ablation_mode)
    actadd = ActAdd.from_directions(direction, 1.0)
    harmful_specs = [NoEdit(), ablation, *(extra or [])]
    ws.run.update_manifest(decoding=DECODING)
    with ws.timed("evaluate"):
        for name, prompts in sets.eval_harmful.items():
            for spec in harmful_specs:
                records.append(_refusal(ws, prompts, name, spec))
        base_lp = None
        for spec in (NoEdit(), ablation, actadd, *(extra or [])):
            first: list = []  # generation's first-step log-probs: the KL pass comes free
            rec = _refusal(ws, sets.eval_harmless, ev.eval_harmless, spec, first)
            rec["kl"], base_lp = evaluate_kl(ws.adapter, ws.chat, sets.eval_harmless, spec, base_lp,
                                             ws.settings.model.batch_size, new_logprobs=first[0])
            records.append(rec)
        ws.run.add_metrics(records)
    return records


def _refusal(ws: Workspace, prompts: list[Prompt], dataset: str, spec: Edit, first: list | None = None) -> dict:
    ev = ws.settings.evaluation
    return evaluate_refusal(ws.adapter, ws.chat, prompts, dataset, spec, max_new_tokens=ev.max_new_tokens,
                            batch_size=ev.generation_batch_size,
                            completions_path=ws.run.completions_path(dataset, spec.label),
                            stop_when_decided=ev.stop_when_decided, first_logprobs=first,
                            backend=ws.generation_backend(), judge=ws.judge())


def build_direction(settings: Settings, run_dir: str | Path, *, sets: PromptSets | None = None, resume: bool = False,
                    allow_low_refusal: bool = False) -> tuple[Workspace, PromptSets, DirectionSet]:
    """Open (or continue) a run and make its selected DIM direction: extract → DIM → select.

    ``sets``: the prompt sets (default: the settings' own). An existing run directory is continued only
    with settings that keep its artifacts valid.
    """
    sets = sets or load_prompt_sets(settings)  # bad dataset input fails here, before anything is created
    ws = open_workspace(settings, run_dir, generates=True)  # the runs built on it go on to generate
    acts = extract_step(ws, sets, resume, allow_low_refusal)
    direction = select_step(ws, dim_step(ws.run, acts), sets, resume)
    return ws, sets, direction


def run(settings: Settings, run_dir: str | Path, resume: bool = False,
        allow_low_refusal: bool = False) -> tuple[Workspace, list[dict]]:
    """The default job. Returns the workspace and the metrics records it wrote."""
    ws, sets, direction = build_direction(settings, run_dir, resume=resume, allow_low_refusal=allow_low_refusal)
    records = evaluate_step(ws, direction, sets)
    ws.run.update_manifest(status="complete", direction={"layer": direction.layer, "position": direction.position,
                                                          "norm": float(direction.norms[0])})
    from refusal_atlas.report.html import build_report

    build_report(ws.run.path)
    return ws, records


def format_table(records: list[dict]) -> str:
    """A small fixed-width table of metrics records: every rate with its judge and generation length, and a
    deflection column when the judge told deflections apart."""
    from refusal_atlas.evaluation.evaluate import format_deflection

    deflect = any("deflection_rate" in r for r in records)
    header = (f"{'dataset':<16} {'intervention':<26} {'judge':<10} {'tokens':>6} {'n':>4} {'refusal':>8}  "
              f"{'95% CI':<15} {'KL':>7}" + ("  deflection [95% CI]" if deflect else ""))
    lines = [header, "-" * len(header)]
    for r in records:
        kl = f"{r['kl']:.3f}" if r.get("kl") is not None else "-"
        ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        line = (f"{r['dataset']:<16} {r['intervention']:<26} {str(r.get('judge') or '-'):<10} "
                f"{r.get('max_new_tokens') or '-':>6} {r['n']:>4} {r['refusal_rate']:>8.2f}  {ci:<15} {kl:>7}")
        lines.append(line + (f"  {format_deflection(r)}" if deflect else ""))
    return "\n".join(lines)
