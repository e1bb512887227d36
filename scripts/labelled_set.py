"""The unlabelled half of the judge-accuracy set (issue 28, item 4): greedy (prompt, response) pairs of a
run's model under edits from none to full DIM ablation, for careful labelling as refusal / deflection /
compliance / broken.

Conditions (edit strengths), all with the run's selected DIM direction:

* ``none``      – the unedited model;
* ``dim_<s>``   – s ∈ {0.25, 0.5, 0.75, 1.0}: the search's uniform-strength warm start
  (``EditSpace.full_ablation_params(layer, s)`` → ``decode`` → ``build_edit``, exactly what
  ``workflows/search.py`` enqueues as its anchor trials): a LayerwiseAblation of the DIM direction at the
  selected layer with weight s on every attention out-projection and MLP down-projection write, and the
  embedding rows edited only at s = 1 (the search's rule: ``embed = strength >= 1``). So ``dim_1.0`` is
  full directional ablation (checked against the run's own ``ablate:dim`` hook at start, see the sidecar);
* ``actadd``    – the DIM vector (raw difference in means) added at its layer with coefficient 1, as the
  demo's evaluation does (``ActAdd.from_directions(direction, coeff=1.0)``); harmless prompts only.

Prompts (none from a set that reported numbers come from): harmful from ``malicious_instruct`` and
``tdc2023``, harmless from ``harmless_train``, over-refusal probes from ``orbench_hard``. Every candidate
that equals (case/punctuation-normalised) or nearly equals (difflib ratio >= --near-dup) a prompt of a
test set (jailbreakbench, harmbench_test, strongreject, harmless_test, xstest and the salad test splits)
is dropped; harmless_train prompts the run itself trained on are dropped too. Prompts are drawn in the
order of a seeded permutation (``random.Random(seed).sample``, the loaders' sampling) of each set as
``load_prompts`` returns it. If a source has too few clean prompts, the shortfall goes to the other
harmful source (tdc2023 overlaps HarmBench/JailbreakBench heavily).

Generation: the repo's batched greedy decoding (``model.generation.greedy_generate``, decoded exactly as
``model.generation.generate`` does: special tokens skipped, stripped), no system prompt passed (the chat
template's default), no early stop, ``--max-new-tokens`` tokens. Each condition runs as one call over
all of its prompts; the baseline pass runs once.

Resumable: each condition's rows are appended to ``--out`` when it finishes; on restart, complete
conditions are skipped (a partial or mismatching condition is dropped and redone). A sidecar
``<out>.meta.json`` records the command, the direction, fingerprints, checks, timings, machine and date.
After generation it prints counts, substring-judge refusal rates and examples per condition, and with
``--blind-dir`` writes shuffled, condition-blind chunk files (id, role, instruction, response).

    PYTHONPATH=src python scripts/labelled_set.py --run-dir runs/demo --out labelled/completions.jsonl \
        --blind-dir labelled/blind
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import hashlib
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

STRENGTHS = (0.25, 0.5, 0.75, 1.0)
TEST_SETS = ("jailbreakbench", "harmbench_test", "strongreject", "harmless_test", "xstest",
             "salad_harmful_test", "salad_harmless_test")
HARMFUL_SOURCES = ("malicious_instruct", "tdc2023")
# condition order: the baseline first, full ablation next, so an interrupted job has both ends
ORDER = ("none", "dim_1.0", "dim_0.5", "dim_0.25", "dim_0.75", "actadd")
# which roles each condition covers
ROLES_OF = {"none": ("harmful", "harmless", "over_refusal"), "dim_1.0": ("harmful", "harmless", "over_refusal"),
            "dim_0.25": ("harmful",), "dim_0.5": ("harmful",), "dim_0.75": ("harmful",), "actadd": ("harmless",)}
FRACTIONAL_HALVABLE = ("dim_0.25", "dim_0.75")


def sha12(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def row_id(source: str, instruction: str, condition: str) -> str:
    return sha12(f"{source}\x00{instruction}\x00{condition}")


def norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a finished run (manifest.json, selection.json, directions/)")
    ap.add_argument("--out", required=True, help="JSONL of completions (appended per condition; resumable)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=28, help="prompt sampling, blind shuffle, torch seed (default 28)")
    ap.add_argument("--generation-batch-size", type=int, default=128,
                    help="largest generation batch; each call is split into equal batches no larger than this")
    ap.add_argument("--n-harmful", type=int, default=60, help="prompts per harmful source")
    ap.add_argument("--n-harmless", type=int, default=40)
    ap.add_argument("--n-over-refusal", type=int, default=40)
    ap.add_argument("--near-dup", type=float, default=0.8,
                    help="difflib ratio (normalised text) at or above which a candidate counts as a test-set prompt")
    ap.add_argument("--fractional", choices=("auto", "all", "half"), default="auto",
                    help="harmful prompts under dim_0.25/dim_0.75: all, half, or auto (half if the baseline "
                         "pass projects the whole job above --budget-min); decided once, kept in the sidecar")
    ap.add_argument("--budget-min", type=float, default=60.0)
    ap.add_argument("--blind-dir", default=None, help="write shuffled condition-blind chunk_<i>.jsonl files here")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--examples", type=int, default=3, help="example responses printed per condition")
    return ap.parse_args(argv)


# --- prompts ---------------------------------------------------------------------------------------
class Excluder:
    """Is a candidate a (near-)copy of a test-set prompt, or one the run trained on?"""

    def __init__(self, near: float, extra: dict[str, list[str]]):
        from refusal_atlas.data import load_prompts

        self.near = near
        self.test: dict[str, str] = {}  # normalised text -> set name
        for name in TEST_SETS:
            for p in load_prompts(name):
                self.test.setdefault(norm(p.instruction), name)
        self.test_list = list(self.test)
        self.extra = {norm(t): why for why, texts in extra.items() for t in texts}

    def why(self, text: str) -> str | None:
        n = norm(text)
        if n in self.test:
            return f"exact:{self.test[n]}"
        if n in self.extra:
            return self.extra[n]
        sm = difflib.SequenceMatcher(None, "", n, autojunk=False)
        for t in self.test_list:
            sm.set_seq1(t)  # seq2 (the candidate) keeps its cached index
            if sm.real_quick_ratio() >= self.near and sm.quick_ratio() >= self.near and sm.ratio() >= self.near:
                return f"near:{self.test[t]}:{round(sm.ratio(), 3)}:{t[:80]}"
        return None


def draw(name: str, n: int, seed: int, exc: Excluder, log: dict) -> list[str]:
    """Up to n prompts of ``name`` in seeded-permutation order, skipping excluded ones."""
    from refusal_atlas.data import load_prompts

    full = load_prompts(name)
    order = random.Random(seed).sample(full, len(full))
    out, dropped = [], []
    for p in order:
        if len(out) == n:
            break
        why = exc.why(p.instruction)
        if why:
            dropped.append({"prompt_id": sha12(p.instruction), "instruction": p.instruction[:120], "why": why})
        else:
            out.append(p.instruction)
    log[name] = {"set_size": len(full), "drawn": len(out), "asked": n, "skipped_before_quota": dropped}
    return out


def choose_prompts(args, run_cfg: dict) -> tuple[dict, dict]:
    """{role: [(source, instruction), ...]} and a record of how they were chosen."""
    from refusal_atlas.data import load_prompts

    run_seed, n_train = run_cfg.get("seed", 0), run_cfg.get("n_train", 128)
    run_harmless = [p.instruction for p in load_prompts(run_cfg.get("harmless_train", "harmless_train"),
                                                        n=n_train, seed=run_seed)]
    run_harmful = {norm(p.instruction) for p in load_prompts(run_cfg.get("harmful_train", "harmful_train"),
                                                             n=n_train, seed=run_seed)}
    harmful_train_all = {norm(p.instruction) for p in load_prompts("harmful_train")}
    exc = Excluder(args.near_dup, {"run_train:harmless_train": run_harmless})
    log: dict = {"excluded_test_sets": list(TEST_SETS), "near_dup_ratio": args.near_dup, "seed": args.seed,
                 "sources": {}}
    # harmful: quota per source; a shortfall in one goes to the other
    pools = {s: draw(s, 2 * args.n_harmful, args.seed, exc, log["sources"]) for s in HARMFUL_SOURCES}
    short = {s: max(0, args.n_harmful - len(pools[s])) for s in HARMFUL_SOURCES}
    take = {s: min(len(pools[s]), args.n_harmful + sum(v for k, v in short.items() if k != s)) for s in HARMFUL_SOURCES}
    harmful = [(s, t) for s in HARMFUL_SOURCES for t in pools[s][: take[s]]]
    for s in HARMFUL_SOURCES:
        log["sources"][s].update(used=take[s], clean_available_in_first_pass=len(pools[s]))
        log["sources"][s]["skipped_before_quota"] = [d for d in log["sources"][s]["skipped_before_quota"]]
    harmless = [("harmless_train", t) for t in draw("harmless_train", args.n_harmless, args.seed, exc, log["sources"])]
    over = [("orbench_hard", t) for t in draw("orbench_hard", args.n_over_refusal, args.seed, exc, log["sources"])]
    log["harmful_in_harmful_train_split"] = sum(norm(t) in harmful_train_all for _, t in harmful)
    log["harmful_in_run_train_sample"] = sum(norm(t) in run_harmful for _, t in harmful)
    return {"harmful": harmful, "harmless": harmless, "over_refusal": over}, log


def fractional_subset(harmful: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Half of the harmful prompts, half of each source (the first ones drawn)."""
    by: dict[str, list] = defaultdict(list)
    for s, t in harmful:
        by[s].append((s, t))
    return [x for s in by for x in by[s][: math.ceil(len(by[s]) / 2)]]


# --- files ---------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line of a crashed write: its condition is redone
    return rows


def write_rows(path: Path, rows: list[dict], mode: str) -> None:
    with path.open(mode, encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        name = platform.processor() or "?"
    return f"{name}; {os.cpu_count()} CPUs; {platform.platform()}"


# --- main ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.search.sources import EditContext
    from refusal_atlas.evaluation.judges.base import JudgeItem
    from refusal_atlas.evaluation.judges.substring import SubstringJudge
    from refusal_atlas.model.generation import DECODING, greedy_generate
    from refusal_atlas.edits import ActAdd, DirectionalAblation, NoEdit
    from refusal_atlas.core.io import read_json
    from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model
    from refusal_atlas.search.edit_space import EditSpace, build_edit, context_fingerprint
    from refusal_atlas.core.seeding import seed_everything

    run_dir = Path(args.run_dir)
    manifest = read_json(run_dir / "manifest.json")
    selection = read_json(run_dir / "selection.json")
    if manifest.get("status") != "complete":
        print(f"warning: {run_dir} manifest status is {manifest.get('status')!r}", file=sys.stderr)
    from refusal_atlas.settings import flat_config

    run_cfg, minfo = flat_config(manifest.get("config", {})), manifest.get("model", {})  # flat names, any manifest
    sha = minfo.get("gguf_sha256") or minfo.get("sha256") or ""
    model_tag = f"{minfo.get('name', run_cfg.get('model'))}@{sha[:12]}" if sha else str(minfo.get("name"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path = out.with_name(out.stem + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    # prompts and plan
    t0 = time.perf_counter()
    prompts, selection_log = choose_prompts(args, run_cfg)
    print("prompts: " + ", ".join(f"{r} {len(v)}" for r, v in prompts.items())
          + f" ({Counter(s for v in prompts.values() for s, _ in v)}); chosen in {time.perf_counter() - t0:.1f} s",
          flush=True)
    if meta.get("prompt_ids") and meta["prompt_ids"] != {r: [sha12(t) for _, t in v] for r, v in prompts.items()}:
        raise SystemExit(f"{meta_path} was made with other prompts (seed/sizes/run changed): use a new --out")
    fractional = meta.get("fractional") or (args.fractional if args.fractional != "auto" else None)

    def plan(condition: str, frac: str | None) -> list[tuple[str, str, str]]:
        items = []
        for role in ROLES_OF[condition]:
            pool = prompts[role]
            if role == "harmful" and condition in FRACTIONAL_HALVABLE and frac == "half":
                pool = fractional_subset(pool)
            items += [(role, s, t) for s, t in pool]
        return items

    # what is done already
    rows = read_rows(out)
    for r in rows:
        if r.get("max_new_tokens") != args.max_new_tokens or r.get("model") != model_tag:
            raise SystemExit(f"{out} holds rows with max_new_tokens {r.get('max_new_tokens')} / model "
                             f"{r.get('model')}, this job {args.max_new_tokens} / {model_tag}: use a new --out")
    by_cond: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_cond[r["condition"]].append(r)
    done = set()
    for c, rs in by_cond.items():
        if c in ROLES_OF and (c not in FRACTIONAL_HALVABLE or fractional):
            want = {row_id(s, t, c) for _, s, t in plan(c, fractional)}
            if {r["id"] for r in rs} == want and len(rs) == len(want):
                done.add(c)
    if len(done) < len(by_cond) or sum(len(by_cond[c]) for c in done) != len(rows):
        kept = [r for r in rows if r["condition"] in done]
        print(f"dropping {len(rows) - len(kept)} rows of incomplete conditions "
              f"{sorted(set(by_cond) - done)}", flush=True)
        write_rows(out, kept, "w")
    todo = [c for c in ORDER if c not in done]
    print(f"conditions done: {sorted(done) or 'none'}; to run: {todo or 'none'}", flush=True)

    timings = dict(meta.get("timings_s", {}))
    checks = dict(meta.get("checks", {}))
    if todo:
        seed_everything(args.seed)
        t0 = time.perf_counter()
        loaded = load_model(run_cfg.get("model", "embedded"), device=run_cfg.get("device"), dtype=run_cfg.get("dtype"))
        adapter = ModelAdapter(loaded.model)
        chat = ChatFormatter(loaded.tokenizer, system=None)
        timings["load_model"] = round(time.perf_counter() - t0, 2)
        print(f"model {loaded.name} loaded in {timings['load_model']} s ({loaded.info.get('dtype')}, "
              f"{loaded.info.get('device')})", flush=True)
    direction = DirectionSet.load(run_dir / "directions" / "dim.safetensors")
    ctx = EditContext.from_run(run_dir)
    space = EditSpace.for_context(ctx)
    edits = {}
    for s in STRENGTHS:
        choice = space.decode(space.full_ablation_params(direction.layer, s))
        edits[f"dim_{s}"] = build_edit(choice, ctx, name=f"dim_{s}")
    actadd = ActAdd.from_directions(direction, coeff=1.0)
    specs = {"none": NoEdit(), **edits, "actadd": actadd}

    # checks: the edit's direction is the selected DIM direction; dim_1.0 equals the run's ablate:dim
    unit = direction.unit()[0]
    checks["cos_edit_direction_vs_dim"] = float(torch.nn.functional.cosine_similarity(
        edits["dim_1.0"].per_layer[0, 0], unit, dim=0))
    if todo and "full_ablation_max_abs_logit_diff" not in checks:
        probe = [t for _, t in prompts["harmful"][:2]] + [t for _, t in prompts["harmless"][:1]]
        diffs = []
        with torch.inference_mode():
            for text in probe:
                enc = chat.encode([text], device=adapter.device)
                outs = []
                for spec in (edits["dim_1.0"], DirectionalAblation.from_directions(direction, mode=run_cfg.get("ablation_mode", "subspace"))):
                    with spec.apply(adapter):
                        outs.append(adapter.model(**enc).logits[0, -1].float())
                diffs.append(float((outs[0] - outs[1]).abs().max()))
        checks["full_ablation_max_abs_logit_diff"] = max(diffs)
        checks["full_ablation_check"] = ("last-position logits of 3 prompts: dim_1.0 LayerwiseAblation vs "
                                         "DirectionalAblation.from_directions(dim) hooks")
        print(f"check: dim_1.0 vs ablate:dim max |Δlogit| = {max(diffs):.2e}", flush=True)

    def save_meta(status: str) -> None:
        doc = {
            "status": status,
            "command": " ".join([sys.executable, *sys.argv]),
            "argv": sys.argv[1:],
            "pythonpath": os.environ.get("PYTHONPATH"),
            "run_dir": str(run_dir.resolve()),
            "model": model_tag, "model_info": minfo,
            "direction": {"method": direction.method, "layer": direction.layer, "position": direction.position,
                          "norm": float(direction.norms[0]), "fingerprint": direction.fingerprint(),
                          "selection_chosen": selection.get("chosen"), "selection_relaxed_filters": selection.get("relaxed_filters")},
            "edit_context_fingerprint": context_fingerprint(ctx),
            "conditions": {c: {"label": getattr(spec, "label", c),
                               "fingerprint": spec.fingerprint() if callable(getattr(spec, "fingerprint", None))
                               else getattr(spec, "fingerprint", None),
                               "spec": (spec.describe() if hasattr(spec, "describe") else None),
                               "roles": list(ROLES_OF[c])} for c, spec in specs.items()},
            "construction": ("dim_<s>: EditSpace.full_ablation_params(layer, s) -> decode -> build_edit (the search's "
                             "uniform-strength warm starts): attn/mlp weight s on every block, embedding edited only "
                             "at s >= 1; actadd: ActAdd.from_directions(dim, coeff=1.0) as workflows/run.py"),
            "fractional": fractional,
            "decoding": {**DECODING, "max_new_tokens": args.max_new_tokens, "stop_when": None,
                         "system_prompt": None, "generation_batch_size_max": args.generation_batch_size},
            "prompt_selection": selection_log,
            "prompt_ids": {r: [sha12(t) for _, t in v] for r, v in prompts.items()},
            "checks": checks,
            "timings_s": timings,
            "machine": machine(),
            "torch_threads": torch.get_num_threads(),
            "date": meta.get("date") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "last_update": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_head": _git_head(),
        }
        meta_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    save_meta("running" if todo else "complete")
    for c in todo:
        if c in FRACTIONAL_HALVABLE and fractional is None:
            # decide once from the measured baseline cost per row
            rate = timings["none"] / len(plan("none", "all"))
            total = sum(len(plan(k, "all")) for k in ORDER) * rate
            fractional = "half" if total > 60 * args.budget_min else "all"
            print(f"projected generation at full size: {total / 60:.1f} min -> dim_0.25/0.75 use {fractional} "
                  "of the harmful prompts", flush=True)
            save_meta("running")
        items = plan(c, fractional)
        n_batches = math.ceil(len(items) / args.generation_batch_size)
        bs = math.ceil(len(items) / n_batches)
        print(f"[{c}] {len(items)} prompts ({Counter(r for r, _, _ in items)}), batch {bs}, "
              f"{args.max_new_tokens} tokens ...", flush=True)
        t0 = time.perf_counter()
        gens = greedy_generate(adapter, chat, [t for _, _, t in items], max_new_tokens=args.max_new_tokens,
                               batch_size=bs, intervention=specs[c], desc=c)
        timings[c] = round(time.perf_counter() - t0, 2)
        new = []
        for (role, src, text), g in zip(items, gens):
            new.append({"id": row_id(src, text, c), "prompt_id": sha12(text), "source": src, "role": role,
                        "condition": c, "instruction": text,
                        "response": chat.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip(),
                        "max_new_tokens": args.max_new_tokens, "model": model_tag,
                        "stop": g.stop, "n_new_tokens": len(g.token_ids)})
        write_rows(out, new, "a")
        n_tok = sum(r["n_new_tokens"] for r in new)
        print(f"[{c}] done in {timings[c]:.0f} s ({n_tok} tokens, {n_tok / timings[c]:.1f} tok/s); "
              f"{sum(r['stop'] == 'max_new_tokens' for r in new)}/{len(new)} hit the token limit", flush=True)
        save_meta("running")
    timings.setdefault("invocations", []).append(
        {"wall_s": round(time.perf_counter() - t_start, 2), "ran": todo,
         "ended": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    save_meta("complete")

    rows = read_rows(out)
    summarize(rows, args.examples, SubstringJudge(), JudgeItem)
    if args.blind_dir:
        write_blind(rows, Path(args.blind_dir), args.chunks, args.seed)
    return 0


def _git_head() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarize(rows: list[dict], n_examples: int, judge, JudgeItem) -> None:
    print(f"\n{len(rows)} rows; by source: {dict(Counter(r['source'] for r in rows))}")
    print(f"{'condition':<10} {'role':<13} {'n':>4} {'substring refusal':>18} {'at token limit':>15}")
    for c in ORDER:
        for role in ("harmful", "harmless", "over_refusal"):
            rs = [r for r in rows if r["condition"] == c and r["role"] == role]
            if not rs:
                continue
            v = judge.judge([JudgeItem(r["instruction"], r["response"]) for r in rs], role=role)
            rate = sum(x.refused for x in v) / len(v)
            cut = sum(r.get("stop") == "max_new_tokens" for r in rs)
            print(f"{c:<10} {role:<13} {len(rs):>4} {rate:>18.2f} {cut:>15}")
    by_src = Counter((r["condition"], r["source"]) for r in rows)
    print("\ncounts per condition x source:")
    for (c, s), n in sorted(by_src.items(), key=lambda x: (ORDER.index(x[0][0]), x[0][1])):
        print(f"  {c:<10} {s:<20} {n}")
    for c in ORDER:
        rs = [r for r in rows if r["condition"] == c]
        if not rs:
            continue
        print(f"\n--- {c}: {n_examples} examples")
        for r in random.Random(c).sample(rs, min(n_examples, len(rs))):
            resp = r["response"][:200].replace("\n", "\\n")
            print(f"  [{r['role']}/{r['source']}] {r['instruction'][:90]!r}\n     -> {resp!r}")


def write_blind(rows: list[dict], folder: Path, chunks: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(rows, key=lambda r: r["id"])  # file order never matters
    random.Random(seed).shuffle(order)
    size = math.ceil(len(order) / chunks)
    for i in range(chunks):
        part = [{"id": r["id"], "role": r["role"], "instruction": r["instruction"], "response": r["response"]}
                for r in order[i * size:(i + 1) * size]]
        write_rows(folder / f"chunk_{i + 1}.jsonl", part, "w")
    print(f"\nblind chunks: {chunks} files in {folder} ({[min(size, len(order) - i * size) for i in range(chunks)]} rows)")


if __name__ == "__main__":
    raise SystemExit(main())
