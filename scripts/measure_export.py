"""Cheap re-scoring of exports (one forward pass per prompt): first-token refusal and KL vs the original.

    python scripts/measure_export.py RUN_DIR EXPORT_DIR... [--n 100] [--out results.json]

For the run's original model, its hook ablation and every export: the mean refusal log-odds and the
share of prompts whose refusal log-odds is > 0 on held-out JailbreakBench, and the first-token
KL(original ‖ model) and KL(hook ablation ‖ model) on harmless_test. Generation-based refusal rates
come from `refusal-atlas evaluate --model` (much slower on CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from refusal_atlas.data import load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.exported import ExportedModel, exported_kind, load_exported
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.workflows.workspace import reopen_workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("exports", type=Path, nargs="+")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ws = reopen_workspace(args.run_dir)
    harmful = [p.instruction for p in load_prompts("jailbreakbench", n=args.n, seed=ws.settings.data.seed)]
    harmless = [p.instruction for p in load_prompts("harmless_test", n=args.n, seed=ws.settings.data.seed)]
    bs = ws.settings.model.batch_size

    def score(spec) -> tuple[dict, object]:
        start = time.perf_counter()
        lp_harm = next_token_logprobs(ws.adapter, ws.chat, harmful, bs, intervention=spec)
        lp_safe = next_token_logprobs(ws.adapter, ws.chat, harmless, bs, intervention=spec)
        s = refusal_score(lp_harm, ws.refusal_ids)
        return {"refusal_logodds": float(s.mean()), "refusal_first_token_rate": float((s > 0).double().mean()),
                "seconds": round(time.perf_counter() - start, 1)}, lp_safe

    rows = {}
    base, base_lp = score(None)
    rows["original"] = {**base, "kl_vs_original": 0.0}
    hook = DirectionalAblation.from_directions(DirectionSet.load(ws.run.direction_path("dim")))
    row, hook_lp = score(hook)
    rows["hook ablation"] = {**row, "kl_vs_original": float(next_token_kl(base_lp, hook_lp).mean()), "kl_vs_hook": 0.0}
    for path in args.exports:
        loaded = load_exported(path, device=ws.settings.model.device, dtype=ws.settings.model.dtype)
        row, lp = score(ExportedModel(loaded.model, path, exported_kind(path)))
        rows[path.name] = {**row, "kl_vs_original": float(next_token_kl(base_lp, lp).mean()),
                           "kl_vs_hook": float(next_token_kl(hook_lp, lp).mean())}
        del loaded
        print(path.name, rows[path.name], flush=True)
    print(f"{'model':<16} {'refusal log-odds':>16} {'rate(>0)':>9} {'KL orig':>9} {'KL hook':>9}")
    for name, r in rows.items():
        print(f"{name:<16} {r['refusal_logodds']:>16.3f} {r['refusal_first_token_rate']:>9.2f} "
              f"{r['kl_vs_original']:>9.4f} {r.get('kl_vs_hook', float('nan')):>9.2e}")
    if args.out:
        args.out.write_text(json.dumps({"n": args.n, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
