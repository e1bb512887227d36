"""How the substring refusal verdict depends on the generation length (baseline vs DIM ablation).

Generates once at the longest length and truncates token-wise for the shorter ones. Greedy
decoding is deterministic and causal, so the first k tokens of a 256-token continuation are
exactly the continuation that ``max_new_tokens=k`` would produce (same batches, same padding).

    flock /tmp/refusal_atlas_cpu.lock nice -n 10 .venv/bin/python bench/generation_length.py \
        [--activations RUN/activations.safetensors] [--n 50] [--layer 14] [--out result.json]

Without ``--activations`` the DIM direction is built like the integration tests do (48 + 48 train
prompts). Prints a markdown table: refusal rate (95% CI) per length, how many verdicts differ from
the 256-token verdict, and how many responses had already ended.
"""

from __future__ import annotations

import argparse
import json
import time

from refusal_atlas.model.activations import extract, load_activation_sets
from refusal_atlas.data import load_prompts
from refusal_atlas.directions.dim import difference_in_means
from refusal_atlas.evaluation.damage import greedy_continuations
from refusal_atlas.evaluation.refusal import is_refusal
from refusal_atlas.evaluation.stats import rate_record
from refusal_atlas.edits import DirectionalAblation, NoEdit
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model


def dim_direction(adapter, chat, layer: int, activations: str | None):
    if activations:
        acts = load_activation_sets(activations)
    else:
        kw = dict(layers=[layer], positions=[-1], batch_size=16)
        acts = {name: extract(adapter, chat, [p.instruction for p in load_prompts(f"{name}_train", n=48, seed=0)], **kw)
                for name in ("harmful", "harmless")}
    return difference_in_means(acts["harmful"], acts["harmless"]).at(layer=layer, position=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--dataset", default="jailbreakbench")
    ap.add_argument("--lengths", default="16,32,64,128,256")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--activations", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lengths = sorted(int(x) for x in args.lengths.split(","))

    loaded = load_model("embedded", device="cpu")
    adapter, chat, tok = ModelAdapter(loaded.model), ChatFormatter(loaded.tokenizer), loaded.tokenizer
    eos = set(tok.convert_tokens_to_ids([tok.eos_token])) | {tok.convert_tokens_to_ids("<|im_end|>")}
    direction = dim_direction(adapter, chat, args.layer, args.activations)
    prompts = [p.instruction for p in load_prompts(args.dataset, n=args.n, seed=0)]
    result = {"dataset": args.dataset, "n": len(prompts), "layer": args.layer, "lengths": lengths, "rows": []}
    for spec in (NoEdit(), DirectionalAblation.from_directions(direction)):
        start = time.perf_counter()
        ids = greedy_continuations(adapter, chat, prompts, lengths[-1], args.batch_size, spec,
                                   desc=f"generate [{spec.label}]")
        seconds = time.perf_counter() - start
        final = [is_refusal(tok.decode(x, skip_special_tokens=True).strip()) for x in ids]
        for k in lengths:
            verdicts = [is_refusal(tok.decode(x[:k], skip_special_tokens=True).strip()) for x in ids]
            row = {"intervention": spec.label, "max_new_tokens": k, **rate_record(sum(verdicts), len(verdicts)),
                   "differs_from_longest": sum(a != b for a, b in zip(verdicts, final)),
                   "ended": sum(1 for x in ids if len(x) <= k and x and x[-1] in eos),
                   "generate_s": round(seconds, 1)}
            row["changed"] = [{"instruction": prompts[i], "response_256": tok.decode(ids[i], skip_special_tokens=True)}
                              for i, (a, b) in enumerate(zip(verdicts, final)) if a != b]
            result["rows"].append(row)
    print(f"| intervention | max_new_tokens | refusal rate | 95% CI | verdicts ≠ {lengths[-1]}-token | ended |")
    print("|---|---:|---:|---|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['intervention']} | {r['max_new_tokens']} | {r['rate']:.2f} | [{r['ci95'][0]:.2f}, "
              f"{r['ci95'][1]:.2f}] | {r['differs_from_longest']} | {r['ended']}/{r['n']} |")
    print("generation seconds:", {r["intervention"]: r["generate_s"] for r in result["rows"]})
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
