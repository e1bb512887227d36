"""Does the cheap search signal rank directions like generation + judge does? At what cost?

For DIM candidates at several layers (from a run directory), measure on the same validation prompts:
  cheap:     mean logit refusal score under ablation (one forward pass per prompt),
  expensive: substring refusal rate of greedy generations under ablation.
Prints Spearman's rank correlation between the two and the cost ratio (expensive / cheap).

    .venv/bin/python bench/cheap_signal.py --run-dir runs/demo [--n 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from refusal_atlas.data import load_prompts
from refusal_atlas.evaluation.refusal import is_refusal, next_token_logprobs, refusal_score
from refusal_atlas.model.generation import generate
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.workflows.run import load_dim_candidates
from refusal_atlas.workflows.workspace import reopen_workspace


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", default="4,6,8,10,12,13,14,15,16,18")
    args = ap.parse_args()
    ws = reopen_workspace(args.run_dir)
    cands = load_dim_candidates(ws.run)
    prompts = [p.instruction for p in load_prompts(ws.settings.data.harmful_val, n=args.n, seed=ws.settings.data.seed)]
    cheap, dear, t_cheap, t_dear = [], [], 0.0, 0.0
    layers = [int(x) for x in args.layers.split(",")]
    for layer in layers:
        spec = DirectionalAblation.from_directions(cands.at(layer=layer, position=-1))
        t = time.perf_counter()
        lp = next_token_logprobs(ws.adapter, ws.chat, prompts, ws.settings.model.batch_size, intervention=spec)
        cheap.append(float(refusal_score(lp, ws.refusal_ids).mean()))
        t_cheap += time.perf_counter() - t
        t = time.perf_counter()
        out = generate(ws.adapter, ws.chat, prompts, max_new_tokens=args.tokens, batch_size=ws.settings.model.batch_size,
                       intervention=spec)
        dear.append(sum(map(is_refusal, out)) / len(out))
        t_dear += time.perf_counter() - t
        print(f"layer {layer:>2}: logit score {cheap[-1]:7.3f}   generation refusal rate {dear[-1]:.3f}", flush=True)
    print(f"\nSpearman rank correlation (cheap vs generation+substring): {spearman(cheap, dear):.3f}")
    print(f"cost: cheap {t_cheap:.1f} s, generation {t_dear:.1f} s → ratio {t_dear / t_cheap:.1f}x "
          f"({len(layers)} candidates, {args.n} prompts, {args.tokens} new tokens)")


if __name__ == "__main__":
    main()
