"""`refusal-atlas reproduce`: the two seed papers' claims, each measured and judged in one resumable job.

The job works in an ordinary run directory R (manifest, activations, directions, completions,
metrics.json), so every library step it calls (extraction, DIM selection, SOM, RDO, cones, RepInd,
searches) keeps its own checkpoints and resume rules. On top of that each claim row (a)–(g) is saved
atomically to R/reproduce/rows/<id>.json when it is done; a rerun skips finished rows, and a rerun
with another budget or model is refused before any model loads. R/reproduce.json and
R/reproduce.md (with plots in R/plots) are rewritten after every row.

Data roles: train prompts build directions, validation prompts choose among them (DIM layer, SOM
subsets, k, gradient iterates, searched edits, the strengths compared at matched KL); every number in a
row comes from held-out prompts (the pooled harmful benchmarks, harmless_test, XSTest) that nothing was
fitted or chosen on, and that share no prompt with the train and validation splits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from refusal_atlas.core.crashpoints import crash_point
from refusal_atlas.core.io import read_json, write_json
from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.report.reproduce import write_report
from refusal_atlas.workflows.reproduce.budget import ReproduceBudget, check_same_budget
from refusal_atlas.workflows.reproduce.centroids import row_f
from refusal_atlas.workflows.reproduce.cones import row_d
from refusal_atlas.workflows.reproduce.independence import row_e
from refusal_atlas.workflows.reproduce.rdo_damage import row_c
from refusal_atlas.workflows.reproduce.searched_edit import row_g
from refusal_atlas.workflows.reproduce.shared import (
    ROW_IDS,
    SETTINGS_FILE,
    ReproduceContext,
    ablate,
    held_out_pool,
    say,
    selection_caveats,
)
from refusal_atlas.workflows.reproduce.som_equals_dim import row_a
from refusal_atlas.workflows.reproduce.som_subsets import row_b
from refusal_atlas.workflows.workspace import PromptSets


def row_path(run_dir: Path, row_id: str) -> Path:
    return Path(run_dir) / "reproduce" / "rows" / f"{row_id}.json"


def finished_rows(run_dir: Path) -> dict[str, dict]:
    return {r: read_json(row_path(run_dir, r)) for r in ROW_IDS if row_path(run_dir, r).is_file()}


def check_reproduce_dir(run_dir: Path, budget: ReproduceBudget, model: str) -> None:
    """Before any model loads: the directory is new/empty or a reproduce run with the same settings."""
    from refusal_atlas.workflows.validate import check_new_run_dir

    manifest = check_new_run_dir(run_dir)
    settings = Path(run_dir) / SETTINGS_FILE
    if manifest and not settings.is_file():
        from refusal_atlas.core.errors import ArtifactError

        raise ArtifactError(f"{run_dir} is a run directory of another verb (no {SETTINGS_FILE}); choose a new "
                            "--run-dir for reproduce")
    if settings.is_file():
        check_same_budget(read_json(settings), budget, model)


# --- the job ------------------------------------------------------------------------------------------
def _prompt_sets(b: ReproduceBudget) -> PromptSets:
    """Every prompt set of the job; the held-out sets exclude every prompt of the train and validation files
    (the gradient methods sample their own train prompts from the whole train file)."""
    def get(name: str, n: int) -> list[Prompt]:
        return load_prompts(name, n=n, seed=b.seed)

    def seen(*names: str) -> list[Prompt]:
        return [p for name in names for p in load_prompts(name)]

    return PromptSets(harmful_train=get(b.harmful_train, b.n_harmful_train),
                      harmless_train=get(b.harmless_train, b.n_harmless_train),
                      harmful_val=get(b.harmful_val, b.n_val), harmless_val=get(b.harmless_val, b.n_val),
                      eval_harmful=held_out_pool(b.eval_harmful, b.n_eval, b.seed,
                                                 exclude=seen(b.harmful_train, b.harmful_val)),
                      eval_harmless=held_out_pool((b.eval_harmless,), b.n_eval, b.seed,
                                                  exclude=seen(b.harmless_train, b.harmless_val))[b.eval_harmless])


def _caveats(ctx: ReproduceContext) -> list[str]:
    """The selection's caveats (selection.json); with a fixed layer, DIM's validation KL is measured here."""
    threshold = ctx.ws.settings.selection.kl_threshold
    path = ctx.ws.run / "selection.json"
    if path.is_file():
        return selection_caveats(read_json(path), threshold)
    kl = ctx.kl(ablate(ctx.dim), prompts=ctx.sets.harmless_val, dataset=ctx.budget.harmless_val)
    return selection_caveats(None, threshold, measured_kl=kl["mean"])


def prepare(run_dir: Path, budget: ReproduceBudget, model: str, device: str | None = None,
            dtype: str | None = None, allow_low_refusal: bool = False) -> ReproduceContext:
    """Open (or reopen) R, then extract → DIM → selection on validation prompts (each step resumable)."""
    from refusal_atlas.settings import load_settings
    from refusal_atlas.workflows.run import dim_step, extract_step, select_step
    from refusal_atlas.workflows.workspace import open_workspace

    settings = load_settings(None, budget.run_settings(model, device, dtype))
    sets = _prompt_sets(budget)
    ws = open_workspace(settings, run_dir)
    write_json(Path(run_dir) / SETTINGS_FILE, {"model": model, **budget.to_json()})
    acts = extract_step(ws, sets, resume=True, allow_low_refusal=allow_low_refusal)
    dim = select_step(ws, dim_step(ws.run, acts), sets, resume=True)
    ctx = ReproduceContext(ws, sets, budget, dim)
    ctx.caveats = _caveats(ctx)
    for text in ctx.caveats:
        say(f"caveat: {text}")
    return ctx


RowFn = Callable[[ReproduceContext, dict[str, dict]], dict[str, Any]]


def run_reproduce(run_dir: str | Path, budget: ReproduceBudget, model: str = "embedded", device: str | None = None,
                  dtype: str | None = None, allow_low_refusal: bool = False,
                  rows: Sequence[str] = ROW_IDS) -> dict[str, Any]:
    """Every claim row not yet finished, in order; returns the reproduce.json content.

    The run directory and the model are checked first, before any model loads."""
    from refusal_atlas.settings import load_settings
    from refusal_atlas.workflows.validate import check_model_settings

    run_dir = Path(run_dir)
    check_reproduce_dir(run_dir, budget, model)
    check_model_settings(load_settings(None, budget.run_settings(model, device, dtype)))
    start = time.perf_counter()
    done = finished_rows(run_dir)
    todo = [r for r in rows if r not in done]
    if not todo:
        say(f"all rows already finished in {run_dir}; rewriting the report only")
        return write_report(run_dir, budget.to_json(), done)
    say(f"budget {budget.name}: rows to do {', '.join(todo)} (finished: {', '.join(done) or 'none'})")
    t = time.perf_counter()
    ctx = prepare(run_dir, budget, model, device, dtype, allow_low_refusal)
    say(f"prepared (extract, DIM layer {ctx.dim.layer}) in {time.perf_counter() - t:.0f}s; "
        f"elapsed {time.perf_counter() - start:.0f}s")
    for row_id in todo:
        t = time.perf_counter()
        row = ROW_FUNCTIONS[row_id](ctx, done)
        row["seconds"] = round(time.perf_counter() - t, 1)
        write_json(row_path(run_dir, row_id), row)
        done[row_id] = row
        crash_point("row")
        say(f"row ({row_id}) {row['verdict']['verdict']} in {row['seconds']:.0f}s; "
            f"elapsed {time.perf_counter() - start:.0f}s")
        write_report(run_dir, budget.to_json(), done)
    ctx.ws.run.update_manifest(status="complete" if set(done) == set(ROW_IDS) else "partial: rows " + "".join(sorted(done)))
    return write_report(run_dir, budget.to_json(), done)


ROW_FUNCTIONS = {"a": row_a, "b": row_b, "c": row_c, "d": row_d, "e": row_e, "f": row_f, "g": row_g}
