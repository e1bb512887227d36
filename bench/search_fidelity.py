"""Is the edit search's cheap trial score faithful? Spearman ρ against generation + substring judge.

Runs (or resumes) a real edit search of ``--trials`` trials on a run directory, then regenerates
greedily under every distinct trial's edit on the *same* harmful validation prompts the search scored,
and compares the trial's refusal score (mean logit refusal score, one forward pass per prompt) with
the substring refusal rate of those generations. Prints ρ, the median trial time (from the Optuna
study's start/end times) and the generation cost per trial. Goal (issue 10): ρ ≥ 0.9.

    .venv/bin/python bench/search_fidelity.py --run-dir runs/demo [--trials 30] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from refusal_atlas.edits.sources import EditContext
from refusal_atlas.evaluation.refusal import is_refusal
from refusal_atlas.generation import generate
from refusal_atlas.workflows.run import config_from_run
from refusal_atlas.search import completed, open_study
from refusal_atlas.search.space import build_edit
from refusal_atlas.workflows.search import EditSearchSettings, edit_search_step
from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman ρ with average ranks for ties (refusal rates tie often); NaN when one side is constant."""
    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        return (t.unsqueeze(1) > t).sum(1) + ((t.unsqueeze(1) == t).sum(1) + 1) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ws = open_workspace(config_from_run(args.run_dir), args.run_dir, must_exist=True)
    sets = load_prompt_sets(ws.cfg)
    settings = EditSearchSettings(seed=args.seed, kl_threshold=ws.cfg.kl_threshold)
    summary = edit_search_step(ws, sets, settings, until=args.trials)
    study = open_study(ws.run / "study.db", summary["study"], create=False)
    ctx = EditContext.from_run(ws.run.path)
    prompts = [p.instruction for p in sets.harmful_val]
    cheap, dear, t_gen, trial_s, seen = [], [], [], [], set()
    for t in completed(study):
        trial_s.append((t.datetime_complete - t.datetime_start).total_seconds())
        key = t.user_attrs.get("key")
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        out = generate(ws.adapter, ws.chat, prompts, max_new_tokens=args.tokens, batch_size=ws.cfg.batch_size,
                       intervention=build_edit(t.user_attrs["choice"], ctx))
        t_gen.append(time.perf_counter() - start)
        cheap.append(t.values[0])
        dear.append(sum(map(is_refusal, out)) / len(out))
        print(f"trial {t.number:>3}: score {cheap[-1]:7.3f}  KL {t.values[1]:.4f}  generation refusal {dear[-1]:.3f}",
              flush=True)
    print(f"\nSpearman ρ (trial score vs greedy generation + substring, {len(cheap)} distinct trials, "
          f"{len(prompts)} prompts, {args.tokens} tokens): {spearman(cheap, dear):.3f}")
    print(f"median trial {statistics.median(trial_s):.1f} s (refusal + KL passes); "
          f"median generation {statistics.median(t_gen):.1f} s per trial")


if __name__ == "__main__":
    main()
