"""Extraction speed: ours vs the naive HF way, same prompts, same run; prints medians and the ratio.

Ours: forward pre-hooks, stop after the deepest requested layer, no LM head, length-sorted batches.
Baseline: `output_hidden_states=True` full forward (LM head included) on batches in file order.
Both produce the same means (checked), so the ratio is a like-for-like cost.

    .venv/bin/python bench/extraction.py [--n 64] [--layers 0-15] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from refusal_atlas.model.activations import extract
from refusal_atlas.data import load_prompts
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model


@torch.inference_mode()
def naive_means(model, chat, prompts, layers, batch_size):
    total = None
    for start in range(0, len(prompts), batch_size):
        batch = chat.encode(prompts[start:start + batch_size])
        hs = model(**batch, output_hidden_states=True).hidden_states  # hs[l] = input of block l
        x = torch.stack([hs[l][:, -1] for l in layers], 1).double().sum(0)
        total = x if total is None else total + x
    return total / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-layer", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_model("embedded", device="cpu")
    adapter, chat = ModelAdapter(lm.model), ChatFormatter(lm.tokenizer)
    prompts = [p.instruction for p in load_prompts("harmful_train", n=args.n, seed=0)]
    layers = list(range(args.max_layer + 1))
    ours_t, base_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = extract(adapter, chat, prompts, layers=layers, positions=[-1], batch_size=args.batch_size)
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        base = naive_means(lm.model, chat, prompts, layers, args.batch_size)
        base_t.append(time.perf_counter() - t)
    diff = (ours.mean[0] - base).abs().max().item()
    o, b = statistics.median(ours_t), statistics.median(base_t)
    print(f"extraction of {args.n} prompts, layers 0..{args.max_layer} of {adapter.n_layers}, "
          f"{args.repeats} repeats (median):")
    print(f"  ours     {o:7.2f} s\n  baseline {b:7.2f} s\n  speed-up {b / o:5.2f}x   (max |mean diff| {diff:.2e})")


if __name__ == "__main__":
    main()
