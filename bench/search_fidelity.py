"""Is the edit search's cheap trial score faithful? Spearman ρ against generation + substring judge.

Runs (or resumes) a real edit search of ``--trials`` trials on a run directory with every trial scored
on every prompt (pruning off), then regenerates greedily under every distinct trial's edit on the
*same* harmful validation prompts the search scored, and compares:

* the trial's refusal number (one forward pass per prompt; ``--refusal-stat``: the mean first-token refusal
  probability, the search's default, or the mean refusal log-odds) with the substring refusal rate of
  ``--tokens``-token greedy generations (tie-aware Spearman ρ; goal ≥ 0.9). Every trial records both
  statistics, so both are ranked against the same generations, over all trials and over the stronger half
  (the trials whose generated rate is at most the median: where a front's strong end is decided);
* the same for the first-stage (partial) score the pruning rule looks at, and for "a few generated
  tokens" scores (substring verdict on the first m tokens of the same greedy decoding: the prefix of
  a greedy decoding is the shorter greedy decoding), with the measured cost of an m-token generation;
* the pruning rule replayed on the trials in order: how many it would have stopped and whether any
  trial of the final front would have been among them.

Prints a table and writes JSON (``--json``, default RUN/search_fidelity.json).

    .venv/bin/python bench/search_fidelity.py --run-dir runs/demo [--trials 30] [--tokens 32] [--n-val 32]
        [--refusal-stat probability|logodds] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from refusal_atlas.search.sources import EditContext
from refusal_atlas.evaluation.refusal import is_refusal
from refusal_atlas.model.generation import greedy_generate
from refusal_atlas.core.io import write_json
from refusal_atlas.search.study import completed, open_study
from refusal_atlas.search.edit_space import build_edit
from refusal_atlas.search.trial import REFUSAL_STATS, PruneRule
from refusal_atlas.settings import SearchSettings
from refusal_atlas.workflows.search import edit_search_step
from refusal_atlas.workflows.workspace import load_prompt_sets, reopen_workspace


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman ρ with average ranks for ties (refusal rates tie often); NaN when one side is constant."""
    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        return (t.unsqueeze(1) > t).sum(1) + ((t.unsqueeze(1) == t).sum(1) + 1) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def hybrid(row: dict, m: int) -> float:
    """The m-token substring rate with ties broken by the logit score: rate + (0.5/n)·σ(mean log-odds) keeps
    every rate step (1/n) and orders equal rates by the one-pass score."""
    n = row["n_prompts"]
    return row["few_token_rates"][str(m)] + 0.5 / n / (1 + math.exp(-row["refusal_stats"]["logodds"]))


def stat_correlations(rows: list[dict], truth: list[float]) -> dict[str, float]:
    """Spearman ρ of each recorded refusal statistic against ``truth``, over all rows and over the stronger
    half (rows whose truth is at most its median)."""
    cut = statistics.median(truth)
    strong = [i for i, t in enumerate(truth) if t <= cut]
    out = {}
    for stat in REFUSAL_STATS:
        xs = [r["refusal_stats"][stat] for r in rows]
        out[stat] = spearman(xs, truth)
        out[f"{stat}_stronger_half"] = spearman([xs[i] for i in strong], [truth[i] for i in strong])
    return out


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def replay_pruning(rows: list[dict], rule: PruneRule) -> dict:
    """Apply ``rule`` to the trials in order (front = unpruned trials so far): which would it stop, and
    would it have stopped a trial of the final (unpruned) front?"""
    kept: list[dict] = []
    pruned: list[int] = []
    for r in rows:
        front = [(k["number"], tuple(k["partial"])) for k in kept
                 if not any(dominates(tuple(o["values"]), tuple(k["values"])) for o in kept)]
        if rule.dominating(tuple(r["partial"]), front) is not None:
            pruned.append(r["number"])
        else:
            kept.append(r)
    final_front = [r["number"] for r in rows if not any(dominates(tuple(o["values"]), tuple(r["values"])) for o in rows)]
    return {"rule": rule.describe(), "pruned": pruned, "final_front": final_front,
            "front_trials_pruned": sorted(set(pruned) & set(final_front))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=None, help="validation prompts per side (default: the run's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--few-tokens", default="4,8,16", help="m for the m-token generation scores")
    ap.add_argument("--time-few", type=int, default=2, help="trials on which m-token generations are timed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--refusal-stat", default="probability", choices=REFUSAL_STATS, help="the search's refusal number")
    ap.add_argument("--dtype", default=None, help="search and generate in this dtype (e.g. bfloat16)")
    args = ap.parse_args()
    overrides = {"n_val": args.n_val} if args.n_val else {}
    ws = reopen_workspace(args.run_dir, overrides, allowed=tuple(overrides), load_dtype=args.dtype)
    sets = load_prompt_sets(ws.settings)
    settings = SearchSettings(seed=args.seed, prune=False, refusal_stat=args.refusal_stat)
    t0 = time.perf_counter()
    summary = edit_search_step(ws, sets, settings, until=args.trials)
    search_s = time.perf_counter() - t0
    study = open_study(ws.run / "study.db", summary["study"], create=False)
    ctx = EditContext.from_run(ws.run.path)
    prompts = [p.instruction for p in sets.harmful_val]
    few = [int(m) for m in args.few_tokens.split(",") if m.strip()]
    decode = ws.chat.tokenizer.decode
    rows, trial_s, few_s, seen = [], [], {m: [] for m in few}, set()
    for t in completed(study):
        trial_s.append((t.datetime_complete - t.datetime_start).total_seconds())
        key = t.user_attrs.get("key")
        if key in seen or "reused_from" in t.user_attrs:
            continue
        seen.add(key)
        edit = build_edit(t.user_attrs["choice"], ctx)
        start = time.perf_counter()
        gens = greedy_generate(ws.adapter, ws.chat, prompts, max_new_tokens=args.tokens,
                               batch_size=ws.settings.model.batch_size, intervention=edit, desc="fidelity generate")
        gen_s = time.perf_counter() - start
        rate = {m: sum(is_refusal(decode(g.token_ids[:m], skip_special_tokens=True)) for g in gens) / len(gens)
                for m in [*few, args.tokens]}
        if len(rows) < args.time_few:
            for m in few:
                start = time.perf_counter()
                greedy_generate(ws.adapter, ws.chat, prompts, max_new_tokens=m, batch_size=ws.settings.model.batch_size,
                                intervention=edit, desc=f"{m}-token generate")
                few_s[m].append(time.perf_counter() - start)
        partial = t.user_attrs.get("partial") or {"refusal": float("nan"), "kl": float("nan")}
        rows.append({"number": t.number, "values": list(t.values), "partial": [partial["refusal"], partial["kl"]],
                     "refusal_stats": t.user_attrs["refusal_stats"],
                     "generation_s": gen_s, "refusal_rate": rate[args.tokens],
                     "few_token_rates": {str(m): rate[m] for m in few},
                     "trial_s": trial_s[-1], "n_prompts": len(prompts)})
        write_json(Path(args.json) if args.json else ws.run / "search_fidelity.json", {"partial_rows": rows})
        print(f"trial {t.number:>3}: score {t.values[0]:7.3f}  KL {t.values[1]:.4f}  partial {partial['refusal']:7.3f}"
              f"  refusal@{args.tokens} {rate[args.tokens]:.3f}  ({gen_s:.1f} s)", flush=True)
    truth = [r["refusal_rate"] for r in rows]
    rho = {"trial_score": spearman([r["values"][0] for r in rows], truth),
           "first_stage_score": spearman([r["partial"][0] for r in rows], truth),
           **{f"substring@{m}": spearman([r["few_token_rates"][str(m)] for r in rows], truth) for m in few},
           **{f"substring@{m}+logit": spearman([hybrid(r, m) for r in rows], truth) for m in few}}
    by_stat = stat_correlations(rows, truth)
    med_gen = statistics.median(r["generation_s"] for r in rows)
    result = {
        "run_dir": str(ws.run.path), "n_trials": len(trial_s), "n_distinct": len(rows), "n_prompts": len(prompts),
        "tokens": args.tokens, "refusal_stat": args.refusal_stat, "dtype": args.dtype or "run's", "spearman": rho,
        "spearman_by_statistic": by_stat, "median_trial_s": statistics.median(trial_s),
        "median_generation_s": med_gen, "search_wall_s": search_s,
        "few_token_generation_s": {str(m): statistics.median(v) for m, v in few_s.items() if v},
        "pruning_replay": replay_pruning(rows, PruneRule.for_statistic(args.refusal_stat)), "trials": rows,
        "note": "trial_s = the study's start/end (refusal + KL passes on harmful + harmless val); generation_s = "
                f"greedy {args.tokens}-token generation on the harmful val prompts only",
    }
    out = Path(args.json) if args.json else ws.run / "search_fidelity.json"
    write_json(out, result)
    print(f"\n{len(rows)} distinct trials of {len(trial_s)}, {len(prompts)} harmful val prompts, "
          f"reference = greedy {args.tokens}-token generation + substring judge")
    print(f"  {'score':<28}{'Spearman ρ':>11}  {'median s / trial':<28}")
    print(f"  {f'trial score ({args.refusal_stat})':<28}{rho['trial_score']:>11.3f}  "
          f"{result['median_trial_s']:.1f} (refusal + KL passes)")
    for stat in REFUSAL_STATS:
        print(f"  {f'  mean {stat}, 1 pass':<28}{by_stat[stat]:>11.3f}  stronger half of the trials: "
              f"{by_stat[f'{stat}_stronger_half']:.3f}")
    print(f"  {'first-stage score (25%)':<28}{rho['first_stage_score']:>11.3f}  -")
    for m in few:
        cost = result["few_token_generation_s"].get(str(m))
        print(f"  {f'substring after {m} tokens':<28}{rho[f'substring@{m}']:>11.3f}  "
              f"{f'{cost:.1f} (generation, harmful only)' if cost is not None else '-'}")
        print(f"  {'  same, ties by logit':<28}{rho[f'substring@{m}+logit']:>11.3f}  (same cost)")
    print(f"  {f'substring after {args.tokens} (ref.)':<28}{1.0:>11.3f}  {med_gen:.1f} (generation, harmful only)")
    rp = result["pruning_replay"]
    print(f"pruning replay ({rp['rule']}): would prune {len(rp['pruned'])}/{len(rows)} trials {rp['pruned']}; "
          f"final-front trials among them: {rp['front_trials_pruned'] or 'none'}")
    print(f"search wall {search_s:.0f} s; saved {out}")
    print(json.dumps({"spearman_trial_score": rho["trial_score"]}))


if __name__ == "__main__":
    main()
