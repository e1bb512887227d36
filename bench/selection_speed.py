"""Selection and evaluation: our fast paths against the plain way, in the same run (median of repeats).

Selection: ``select_direction`` (shared-prefix reuse, steering from cached clean block inputs) vs
``fast=False`` (a full left-padded pass per prompt set and candidate), every filter computed
(``exhaustive``) on a subset of candidate layers. Evaluation: greedy generation with prefix reuse,
our argmax loop and early stop once a refusal phrase appears vs HF ``generate`` at full length,
plus the next-token KL pass. Prints times, ratios, the largest score difference and whether every
substring verdict agrees.

    .venv/bin/python bench/selection_speed.py --run-dir runs/demo [--n 16] [--layers 10,14,16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import statistics
import time
from refusal_atlas.data import load_prompts
from refusal_atlas.directions.select import select_direction
from refusal_atlas.evaluation.completions import refusal_decided
from refusal_atlas.evaluation.refusal import is_refusal, next_token_logprobs
from refusal_atlas.model.generation import greedy_generate
from refusal_atlas.edits import DirectionalAblation, NoEdit
from refusal_atlas.workflows.run import load_dim_candidates
from refusal_atlas.workflows.workspace import reopen_workspace


def paired(fast_fn, plain_fn, repeats: int):
    """Median seconds of each, the two interleaved (fast, plain, fast, ...) so load drift hits both alike."""
    times: dict[bool, list[float]] = {True: [], False: []}
    out: dict[bool, object] = {}
    for _ in range(repeats):
        for fast, fn in ((True, fast_fn), (False, plain_fn)):
            t = time.perf_counter()
            out[fast] = fn()
            times[fast].append(time.perf_counter() - t)
    return statistics.median(times[True]), out[True], statistics.median(times[False]), out[False]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--n", type=int, default=16, help="validation / held-out prompts per set")
    ap.add_argument("--layers", default="10,14,16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ws = reopen_workspace(args.run_dir)
    data, cands = ws.settings.data, load_dim_candidates(ws.run)
    batch_size, eval_harmful = ws.settings.model.batch_size, ws.settings.evaluation.eval_harmful
    layers = [int(x) for x in args.layers.split(",")]
    harmful = [p.instruction for p in load_prompts(data.harmful_val, n=args.n, seed=data.seed)]
    harmless = [p.instruction for p in load_prompts(data.harmless_val, n=args.n, seed=data.seed)]

    def select(fast: bool):
        return select_direction(ws.adapter, ws.chat, cands, harmful, harmless, ws.refusal_ids, layers=layers,
                                positions=[-1], batch_size=batch_size, exhaustive=True, fast=fast)

    next_token_logprobs(ws.adapter, ws.chat, harmful[:2], batch_size)  # warm-up, untimed
    t_fast, fast, t_plain, plain = paired(lambda: select(True), lambda: select(False), args.repeats)
    diff = max(abs(f[k] - p[k]) for f, p in zip(fast.scores, plain.scores) for k in ("refusal", "kl", "steering"))
    same = (fast.direction.layer, fast.direction.position) == (plain.direction.layer, plain.direction.position)
    print(f"selection ({len(layers)} candidates x {3 * args.n} prompts, median of {args.repeats}): "
          f"ours {t_fast:.1f} s, plain {t_plain:.1f} s -> {t_plain / t_fast:.2f}x; "
          f"max score difference {diff:.2e}; same winner: {same}", flush=True)

    held_out = [p.instruction for p in load_prompts(eval_harmful[0], n=args.n, seed=data.seed)]
    direction = cands.at(layer=layers[-1], position=-1)
    stop = refusal_decided(ws.chat.tokenizer)
    for spec in (NoEdit(), DirectionalAblation.from_directions(direction)):
        def gen(fast: bool):
            return greedy_generate(ws.adapter, ws.chat, held_out, args.tokens, batch_size, spec,
                                   stop_when=stop if fast else None, fast=fast)

        t_fast, ours, t_plain, full = paired(lambda: gen(True), lambda: gen(False), args.repeats)
        dec = ws.chat.tokenizer.decode
        agree = sum(is_refusal(dec(a.token_ids, skip_special_tokens=True)) == is_refusal(dec(b.token_ids,
                    skip_special_tokens=True)) for a, b in zip(ours, full))
        stopped = sum(g.stop == "decided" for g in ours)
        print(f"generation {eval_harmful[0]} [{spec.label}] ({args.n} prompts x {args.tokens} tokens): "
              f"ours {t_fast:.1f} s, plain {t_plain:.1f} s -> {t_plain / t_fast:.2f}x; "
              f"verdicts equal {agree}/{len(ours)}; stopped early {stopped}", flush=True)
        t_fast, lp_fast, t_plain, lp_plain = paired(
            lambda: next_token_logprobs(ws.adapter, ws.chat, held_out, batch_size, spec),
            lambda: next_token_logprobs(ws.adapter, ws.chat, held_out, batch_size, spec, reuse_prefix=False),
            args.repeats)
        print(f"next-token pass [{spec.label}]: ours {t_fast:.2f} s, plain {t_plain:.2f} s -> "
              f"{t_plain / t_fast:.2f}x; max |dlogp| {(lp_fast - lp_plain).abs().max():.2e}", flush=True)


if __name__ == "__main__":
    main()
