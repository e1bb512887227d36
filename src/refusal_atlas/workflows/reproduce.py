"""`refusal-atlas reproduce`: the two seed papers' claims, each measured and judged in one resumable job.

The job works in an ordinary run directory R (manifest, activations, directions, completions,
metrics.json), so every library step it calls (extraction, DIM selection, SOM, RDO, cones, RepInd,
searches) keeps its own checkpoints and resume rules. On top of that each claim row (a)–(g) is saved
atomically to R/reproduce/rows/<id>.json when it is done; a rerun skips finished rows, and a rerun
with another budget or model is refused before any model loads. R/reproduce.json and
R/reproduce.md (with plots in R/plots) are rewritten after every row.

Data roles: train prompts build directions, validation prompts choose among them (DIM layer, SOM
subsets, k, gradient iterates, searched edits); every number in a row comes from held-out prompts
(JailbreakBench, harmless_test, XSTest) that nothing was fitted or chosen on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_atlas.crashpoints import crash_point
from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.evaluate import evaluate_refusal
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.io import read_json, write_json
from refusal_atlas.workflows.reproduce_budget import ReproduceBudget, check_same_budget
from refusal_atlas.workspace import PromptSets, Workspace

ROW_IDS = ("a", "b", "c", "d", "e", "f", "g")
SETTINGS_FILE = "reproduce/settings.json"


def say(text: str) -> None:
    print(f"[reproduce] {text}", file=sys.stderr, flush=True)


@dataclass
class ReproduceContext:
    """The loaded workspace plus the held-out prompt sets and cached baselines every row shares."""

    ws: Workspace
    sets: PromptSets
    budget: ReproduceBudget
    dim: DirectionSet
    _cache: dict[str, Any] = field(default_factory=dict)

    # --- held-out prompts ----------------------------------------------------------------------
    def prompts(self, name: str, n: int) -> list[Prompt]:
        key = f"prompts:{name}:{n}"
        if key not in self._cache:
            self._cache[key] = load_prompts(name, n=n, seed=self.budget.seed)
        return self._cache[key]

    @property
    def eval_harmful(self) -> list[Prompt]:
        return self.prompts(self.budget.eval_harmful, self.budget.n_eval)

    @property
    def eval_harmless(self) -> list[Prompt]:
        return self.prompts(self.budget.eval_harmless, self.budget.n_eval)

    @property
    def logit_harmful(self) -> list[Prompt]:
        return self.prompts(self.budget.eval_harmful, self.budget.n_logit)

    # --- measurements --------------------------------------------------------------------------
    def refusal_rate(self, spec, dataset: str | None = None, n: int | None = None) -> dict[str, Any]:
        """Greedy generation + substring judge on a held-out set (completions reused on a rerun)."""
        dataset = dataset or self.budget.eval_harmful
        prompts = self.prompts(dataset, n or self.budget.n_eval)
        rec = evaluate_refusal(self.ws.adapter, self.ws.chat, prompts, dataset, spec,
                               max_new_tokens=self.budget.max_new_tokens, batch_size=self.budget.batch_size,
                               completions_path=self.ws.run.completions_path(dataset, spec.label),
                               stop_when_decided=True)
        self.ws.run.add_metrics([rec])
        return {"rate": rec["rate"], "ci95": rec["ci95"], "n": rec["n"], "dataset": dataset,
                "metric": rec["metric"], "intervention": rec["intervention"], "max_new_tokens": rec["max_new_tokens"]}

    def kl(self, spec, prompts: Sequence[Prompt] | None = None) -> dict[str, Any]:
        """Mean next-token KL(base ‖ edited) on held-out harmless prompts, bootstrap 95% interval."""
        prompts = list(prompts or self.eval_harmless)
        texts = [p.instruction for p in prompts]
        key = f"base_lp:{hash(tuple(texts))}"
        if key not in self._cache:
            self._cache[key] = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size)
        new = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size, intervention=spec)
        values = next_token_kl(self._cache[key], new).tolist()
        return {**mean_record(values, seed=self.budget.seed), "dataset": self.budget.eval_harmless}

    def scores(self, spec=None, prompts: Sequence[Prompt] | None = None) -> list[float]:
        """Per-prompt logit refusal scores (one forward pass each) on held-out harmful prompts."""
        texts = [p.instruction for p in (prompts or self.logit_harmful)]
        lp = next_token_logprobs(self.ws.adapter, self.ws.chat, texts, self.budget.batch_size, intervention=spec)
        return [float(s) for s in refusal_score(lp, self.ws.refusal_ids)]

    def score_record(self, spec=None, prompts: Sequence[Prompt] | None = None) -> dict[str, Any]:
        return {**mean_record(self.scores(spec, prompts), seed=self.budget.seed), "dataset": self.budget.eval_harmful,
                "metric": "mean logit refusal score (log-odds of a refusal-start token)"}


# --- rows on disk ------------------------------------------------------------------------------------
def row_path(run_dir: Path, row_id: str) -> Path:
    return Path(run_dir) / "reproduce" / "rows" / f"{row_id}.json"


def finished_rows(run_dir: Path) -> dict[str, dict]:
    return {r: read_json(row_path(run_dir, r)) for r in ROW_IDS if row_path(run_dir, r).is_file()}


def check_reproduce_dir(run_dir: Path, budget: ReproduceBudget, model: str) -> None:
    """Before any model loads: the directory is new/empty or a reproduce run with the same settings."""
    from refusal_atlas.validate import check_new_run_dir

    manifest = check_new_run_dir(run_dir)
    settings = Path(run_dir) / SETTINGS_FILE
    if manifest and not settings.is_file():
        from refusal_atlas.errors import ArtifactError

        raise ArtifactError(f"{run_dir} is a run directory of another verb (no {SETTINGS_FILE}); choose a new "
                            "--run-dir for reproduce")
    if settings.is_file():
        check_same_budget(read_json(settings), budget, model)


# --- the job ------------------------------------------------------------------------------------------
def _prompt_sets(b: ReproduceBudget) -> PromptSets:
    def get(name: str, n: int) -> list[Prompt]:
        return load_prompts(name, n=n, seed=b.seed)

    return PromptSets(harmful_train=get(b.harmful_train, b.n_harmful_train),
                      harmless_train=get(b.harmless_train, b.n_harmless_train),
                      harmful_val=get(b.harmful_val, b.n_val), harmless_val=get(b.harmless_val, b.n_val),
                      eval_harmful={b.eval_harmful: get(b.eval_harmful, b.n_eval)},
                      eval_harmless=get(b.eval_harmless, b.n_eval))


def prepare(run_dir: Path, budget: ReproduceBudget, model: str, device: str | None = None,
            dtype: str | None = None, allow_low_refusal: bool = False) -> ReproduceContext:
    """Open (or reopen) R, then extract → DIM → selection on validation prompts (each step resumable)."""
    from refusal_atlas.config import load_config
    from refusal_atlas.pipeline import dim_step, extract_step, select_step
    from refusal_atlas.workspace import open_workspace

    cfg = load_config(None, budget.run_settings(model, device, dtype))
    sets = _prompt_sets(budget)
    ws = open_workspace(cfg, run_dir)
    write_json(Path(run_dir) / SETTINGS_FILE, {"model": model, **budget.to_json()})
    acts = extract_step(ws, sets, resume=True, allow_low_refusal=allow_low_refusal)
    dim = select_step(ws, dim_step(ws, acts), sets, resume=True)
    return ReproduceContext(ws, sets, budget, dim)


RowFn = Callable[[ReproduceContext, dict[str, dict]], dict[str, Any]]


def run_reproduce(run_dir: str | Path, budget: ReproduceBudget, model: str = "embedded", device: str | None = None,
                  dtype: str | None = None, allow_low_refusal: bool = False,
                  rows: Sequence[str] = ROW_IDS) -> dict[str, Any]:
    """Every claim row not yet finished, in order; returns the reproduce.json content."""
    from refusal_atlas.workflows.reproduce_report import write_report
    from refusal_atlas.workflows.reproduce_rows_more import ROW_FUNCTIONS

    run_dir = Path(run_dir)
    check_reproduce_dir(run_dir, budget, model)
    start = time.perf_counter()
    done = finished_rows(run_dir)
    todo = [r for r in rows if r not in done]
    if not todo:
        say(f"all rows already finished in {run_dir}; rewriting the report only")
        return write_report(run_dir, budget, done)
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
        write_report(run_dir, budget, done)
    ctx.ws.run.update_manifest(status="complete" if set(done) == set(ROW_IDS) else "partial: rows " + "".join(sorted(done)))
    return write_report(run_dir, budget, done)
