"""What one edit-search trial costs at heretic's prompt counts, and where the time goes.

Scores ``--trials`` random edits of the default space (seeded) on ``--n`` ``--harmful`` prompts (refusal;
default JailbreakBench) and ``--n`` ``--harmless`` prompts (KL; default harmless_val) two ways, interleaved:
the staged trial (search_trial: one shared prefix for both sets, no pruning), and the plain
ValidationObjective (separate prefix plans per set). For the staged trial it splits the time into
building the edit, entering/leaving its weight or hook form, the prefix pass, and the harmful and
harmless forward passes. heretic-llm 1.4.0's median trial is never a constant: it is read from
``--heretic``, a ``heretic_search.json`` that bench/vs_heretic.py wrote (machines of one class differ up to
2×, so use one written on this machine), and a ratio is printed only when that heretic run scored the
same numbers of prompts in the same dtype as this one (vs_heretic.py's held-out run: ``--harmful
harmful_val --n 100`` gives its 39 + 100). Without ``--heretic`` no ratio is printed.

It also counts the work one trial must do (matmul FLOPs of the padded tokens of both sets' suffixes, the
shared prefix once, the LM head on each row's last position) and times a plain matmul of the model's
MLP shape in the same run: the ratio of the two is the fastest this CPU could score a trial at this
precision, so it says how far any implementation could go below heretic at equal prompt counts.

``--profile`` scores the first edit once more under torch's profiler and splits that trial into its matmul
kernels (aten::mm/addmm/bmm, with the rate they ran at inside the model) and everything else: the matmul
time alone bounds the trial from below at that rate, whatever the rest costs.

    .venv/bin/python bench/trial_cost.py --run-dir runs/demo [--n 100] [--trials 4] [--dtype bfloat16]
        [--harmful jailbreakbench] [--harmless harmless_val] [--heretic WORK/heretic_search.json]
        [--compare float32_trial_cost.json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import optuna
import torch

from refusal_atlas.data import load_prompts
from refusal_atlas.search.sources import EditContext
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.search.edit_space import EditSpace, build_edit
from refusal_atlas.search.trial import StagedObjective
from refusal_atlas.workflows.workspace import reopen_workspace
from scaling import matmul_rate  # bench/scaling.py, beside this script


def heretic_trial(path: str | None, n_harmful: int, n_harmless: int, dtype: str) -> dict:
    """heretic's median trial from a ``heretic_search.json`` of bench/vs_heretic.py, and whether it is comparable
    with a trial of ours on ``n_harmful`` + ``n_harmless`` prompts in ``dtype`` (same counts, same dtype)."""
    if path is None:
        return {"median_trial_s": None, "from": None, "comparable": False,
                "why": "no --heretic: give a heretic_search.json that bench/vs_heretic.py wrote on this machine"}
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
        seconds = float(run["median_trial_s"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: --heretic {path}: not a heretic_search.json with a median_trial_s ({exc})") from None
    theirs = {"harmful": run.get("n_bad"), "harmless": run.get("n_good"), "dtype": run.get("dtype")}
    ours = {"harmful": n_harmful, "harmless": n_harmless, "dtype": dtype.removeprefix("torch.")}
    differ = [f"{k} {theirs[k]} vs ours {ours[k]}" for k in ours if theirs[k] != ours[k]]
    return {"median_trial_s": seconds, "from": str(path), "heretic": theirs, "comparable": not differ,
            "why": "same prompt counts and dtype" if not differ else "heretic's run differs: " + ", ".join(differ)}


def trial_flops(model, plan) -> float:
    """Matmul FLOPs of one staged trial: every padded suffix token through every layer's projections and
    attention (over prefix + suffix), the prefix once, and the LM head on one position per row."""
    cfg = model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    block = sum(m.weight.numel() for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in name) / layers
    prefix = len(plan.prefix)
    flops = 2 * block * layers * prefix
    for batch in plan.batches:
        n = max(len(plan.suffixes[i]) for i in batch)
        attention = 4 * d * layers * n * (prefix + (n + 1) / 2)  # QK^T and AV per row
        flops += len(batch) * (2 * block * layers * n + attention + 2 * vocab * d)
    return float(flops)


def skippable_fraction(space: EditSpace, ctx: EditContext, n: int = 2000, seed: int = 0) -> float:
    """Mean share of the blocks below an edit's first edited one, over ``n`` random edits of the space: the
    work that skipping them (feeding cached clean block inputs, as selection's steering pass does) would save."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    shares = []
    for _ in range(n):
        edit = build_edit(space.suggest(study.ask()), ctx)
        edited = [j for j, (a, m) in enumerate(zip(edit.attn_weights, edit.mlp_weights)) if a or m]
        first = 0 if edit.embed_weight or not edited else edited[0]
        shares.append(first / ctx.n_layers)
    return statistics.fmean(shares)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--heretic", default=None, help="heretic_search.json of a vs_heretic.py run on this machine")
    ap.add_argument("--harmful", default="jailbreakbench", help="refusal prompt set")
    ap.add_argument("--harmless", default="harmless_val", help="KL prompt set")
    ap.add_argument("--dtype", default=None, help="load the model in this dtype instead of the run's (e.g. bfloat16)")
    ap.add_argument("--compare", default=None, help="trial_cost JSON of the same edits in another dtype: print how "
                                                     "the two rank them (Spearman) and the time ratio")
    ap.add_argument("--profile", action="store_true", help="split one more trial into matmul kernels and the rest")
    args = ap.parse_args()
    if args.heretic:  # read before any model loads: a bad file fails at once, not after the measurement
        heretic_trial(args.heretic, 0, 0, "")
    other = json.loads(Path(args.compare).read_text()) if args.compare else None  # a bad path fails before the model loads
    run_dir = args.run_dir
    # --dtype loads the model in that dtype for this process only; the run's manifest is not touched
    ws = reopen_workspace(run_dir, load_dtype=args.dtype)
    harmful = [p.instruction for p in load_prompts(args.harmful, n=args.n, seed=0)]
    harmless = [p.instruction for p in load_prompts(args.harmless, n=args.n, seed=0)]
    ctx = EditContext.from_run(ws.run.path)
    space = EditSpace.for_context(ctx)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(args.seed))
    choices = [space.suggest(study.ask()) for _ in range(args.trials)]
    t = time.perf_counter()
    staged = StagedObjective(ws.adapter, ws.chat, harmful, harmless, ws.refusal_ids, batch_size=ws.settings.model.batch_size)
    staged.baseline()
    staged._harmless_base()
    plain = ValidationObjective(ws.adapter, ws.chat, harmful, harmless, ws.refusal_ids, batch_size=ws.settings.model.batch_size)
    plain._harmless_base()
    setup_s = time.perf_counter() - t
    nh = len(harmful)
    rows = []
    for i, choice in enumerate(choices):
        t = time.perf_counter()
        edit = build_edit(choice, ctx)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        values = staged.score(edit).values
        staged_s = time.perf_counter() - t
        parts = {}
        t = time.perf_counter()
        with edit.apply(ws.adapter):
            parts["apply_s"] = time.perf_counter() - t
            t = time.perf_counter()
            kv = staged._prefix_kv()
            parts["prefix_s"] = time.perf_counter() - t
            t = time.perf_counter()
            staged._logprobs(list(range(nh)), kv)
            parts["harmful_s"] = time.perf_counter() - t
            t = time.perf_counter()
            staged._logprobs(list(range(nh, len(staged.rows))), kv)
            parts["harmless_s"] = time.perf_counter() - t
            t = time.perf_counter()
        parts["restore_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pvalues = plain(edit)
        plain_s = time.perf_counter() - t
        rows.append({"choice": choice, "build_s": build_s, "staged_s": staged_s, "plain_s": plain_s, **parts,
                     "values": values, "plain_values": pvalues, "weight_form": edit.has_weight_form and not
                     edit.hooks_equal_weights})
        print(f"trial {i}: staged {staged_s:.1f} s, plain {plain_s:.1f} s | build {build_s:.2f}, apply "
              f"{parts['apply_s']:.2f}, prefix {parts['prefix_s']:.2f}, harmful {parts['harmful_s']:.1f}, harmless "
              f"{parts['harmless_s']:.1f}, restore {parts['restore_s']:.2f} | values {values} vs {pvalues}", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("staged_s", "plain_s", "build_s", "apply_s", "prefix_s",
                                                              "harmful_s", "harmless_s", "restore_s")}
    model = ws.adapter.model
    flops = trial_flops(model, staged.plan) if staged.plan else float("nan")
    dtype = next(model.parameters()).dtype
    peak = matmul_rate(model.config.hidden_size, model.config.intermediate_size, dtype, rows=2048, repeats=7)
    floor_s = flops / peak
    skip = skippable_fraction(space, ctx, seed=args.seed)
    heretic = heretic_trial(args.heretic, nh, len(harmless), str(dtype))
    heretic_s = heretic["median_trial_s"] if heretic["comparable"] else None
    out = {"skippable_block_share": skip, "dtype": str(dtype), "trial_gflop": flops / 1e9, "achieved_gflops": flops / med["staged_s"] / 1e9,
           "matmul_peak_gflops": peak / 1e9, "fastest_possible_trial_s": floor_s,
           "best_possible_ratio_vs_heretic": heretic_s / floor_s if heretic_s else None, "n_harmful": nh, "n_harmless": len(harmless), "prefix_tokens": len(staged.plan.prefix) if staged.plan else 0,
           "setup_s": setup_s, "median": med, "harmful_set": args.harmful, "harmless_set": args.harmless,
           "heretic": heretic, "ratio_vs_heretic": heretic_s / med["staged_s"] if heretic_s else None, "trials": rows}
    if args.profile:
        out["profile"] = profile_trial(staged, build_edit(choices[0], ctx), flops)
    with open(args.json or Path(args.run_dir) / "trial_cost.json", "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    print(f"\n{nh} + {len(harmless)} prompts, shared prefix {out['prefix_tokens']} tokens, one-off set-up {setup_s:.1f} s")
    print("median per trial: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in med.items()))
    if heretic_s:
        print(f"vs heretic's {heretic_s:.1f} s median trial ({heretic['from']}): {out['ratio_vs_heretic']:.1f}x cheaper")
    else:
        print(f"no ratio to heretic: {heretic['why']}")
    bound = f" ({out['best_possible_ratio_vs_heretic']:.1f}x heretic's {heretic_s:.1f} s)" if heretic_s else ""
    print(f"work per trial ({out['dtype']}): {out['trial_gflop']:.0f} GFLOP; achieved {out['achieved_gflops']:.0f} GFLOP/s "
          f"against a plain matmul's {out['matmul_peak_gflops']:.0f} GFLOP/s in this run → no trial at these prompt "
          f"counts can take under {floor_s:.1f} s here{bound}")
    print(f"skipping the blocks below each edit's first edited one would save {skip:.1%} of the block work "
          "(mean over 2000 random edits of the default space)")
    if args.profile:
        p = out["profile"]
        print(f"profiled trial {p['trial_s']:.2f} s: matmul kernels {p['matmul_s']:.2f} s ({p['matmul_calls']} calls, "
              f"{p['matmul_gflops']:.0f} GFLOP/s inside the model), everything else {p['other_s']:.2f} s; top others: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in p["top_other"].items()))
        print(f"  with everything else free, a trial still takes {p['matmul_s']:.2f} s at that matmul rate"
              + (f": {heretic_s / p['matmul_s']:.1f}x heretic's {heretic_s:.1f} s at most" if heretic_s else ""))
    if other is not None:
        print(compare_runs(out, other))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_trial(staged, edit, flops: float) -> dict:
    """One staged trial under torch.profiler: self CPU seconds of the matmul kernels vs the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        staged.score(edit)
        trial_s = time.perf_counter() - t
    events = prof.key_averages()
    mm = [e for e in events if e.key in MATMUL_OPS]
    matmul_s = sum(e.self_cpu_time_total for e in mm) / 1e6
    total_s = sum(e.self_cpu_time_total for e in events) / 1e6
    others = sorted((e for e in events if e.key not in MATMUL_OPS), key=lambda e: -e.self_cpu_time_total)[:5]
    return {"trial_s": trial_s, "profiled_total_s": total_s, "matmul_s": matmul_s, "other_s": total_s - matmul_s,
            "matmul_calls": sum(e.count for e in mm), "matmul_gflops": flops / matmul_s / 1e9,
            "top_other": {e.key: e.self_cpu_time_total / 1e6 for e in others}}


def compare_runs(ours: dict, other: dict) -> str:
    """How two trial_cost runs of the same seeded edits (e.g. bfloat16 vs float32) rank them and what each costs."""
    from search_fidelity import spearman  # bench/ is on the path when this script runs

    if [t["choice"] for t in ours["trials"]] != [t["choice"] for t in other["trials"][:len(ours["trials"])]]:
        raise SystemExit("error: --compare holds other edits (use the same --seed, and at least as many --trials)")
    pairs = list(zip(ours["trials"], other["trials"]))
    lines = [f"against {other['dtype']} on the same {len(pairs)} edits: median trial {ours['median']['staged_s']:.2f} s vs "
             f"{other['median']['staged_s']:.2f} s ({other['median']['staged_s'] / ours['median']['staged_s']:.2f}x)"]
    for i, name in enumerate(("refusal score", "KL")):
        a, b = [p[0]["values"][i] for p in pairs], [p[1]["values"][i] for p in pairs]
        rho = spearman(a, b)
        diffs = sorted(x - y for x, y in zip(a, b))
        lines.append(f"  {name}: Spearman rho {rho:.3f}, difference {diffs[0]:+.4f} .. {diffs[-1]:+.4f} "
                     f"(median {statistics.median(diffs):+.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
