"""Greedy generation and next-token scoring time against batch size (the config default is 32).

On CPU, one decoding step reads every weight once whatever the batch, so larger batches amortize
that read; this measures how much, and checks that the greedy outputs do not change.

    .venv/bin/python bench/batch_size.py [--n 96] [--tokens 32] [--sizes 16 32 48] [--repeats 3]

Prints, per batch size, the median seconds over ``--repeats`` runs for generation and for the
one-forward-pass refusal score, their ratio to the first size (the baseline), and how many
completions differ from the baseline's.
"""

from __future__ import annotations

import argparse
import statistics
import time

from refusal_atlas.data import load_prompts
from refusal_atlas.evaluation.refusal import next_token_logprobs
from refusal_atlas.model.generation import generate
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model


def median_seconds(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n", type=int, default=96, help="JailbreakBench prompts")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48], help="the first one is the baseline")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_model(args.model)
    adapter, chat = ModelAdapter(lm.model), ChatFormatter(lm.tokenizer)
    prompts = [p.instruction for p in load_prompts("jailbreakbench", n=args.n, seed=0)]
    rows, base = [], None
    for size in args.sizes:
        gen_s, texts = median_seconds(lambda: generate(adapter, chat, prompts, args.tokens, size), args.repeats)
        score_s, _ = median_seconds(lambda: next_token_logprobs(adapter, chat, prompts, size), args.repeats)
        base = base or (gen_s, score_s, texts)
        rows.append((size, gen_s, gen_s / base[0], score_s, score_s / base[1],
                     sum(a != b for a, b in zip(texts, base[2]))))
    print(f"{args.n} prompts, {args.tokens} new tokens, median of {args.repeats}; ratios vs batch {args.sizes[0]}")
    print("| batch | generate s | ratio | score s | ratio | completions differing |")
    print("|---|---|---|---|---|---|")
    for size, g, gr, s, sr, diff in rows:
        print(f"| {size} | {g:.1f} | {gr:.2f} | {s:.2f} | {sr:.2f} | {diff} / {args.n} |")


if __name__ == "__main__":
    main()
