"""Every edit of the family on one run, each at one strength chosen on validation prompts, measured on held-out prompts.

    python scripts/edits_table.py --run-dir R --out docs/results/data/<date>_edits_table [--ara ara]

What it does (resumable: validation scores, completions and held-out rows are kept as they are made):

1. The reference: full directional ablation of the run's DIM direction (``ablate:dim``, what `run` reports).
   Its validation KL (next-token KL on the run's harmless validation prompts) is the target every other
   edit is matched to.
2. For every other edit, a strength s in its range: the one whose validation KL is nearest the target
   (a few evaluations: a coarse grid, then secant steps on sqrt(KL), which grows about linearly in s).
   Direction-based edits use the uniform-strength construction of the edit search
   (``EditSpace.full_ablation_params(dim layer, s)``: weight s on every o_proj/down_proj write, the
   embedding too at s >= 1) with the edit's own flags (projected, norm-preserving, transform, direction set).
   With ``--ara NAME`` the trained low-rank edit enters twice: as trained, and with its update scaled to the
   target KL; and DIM is matched to the trained edit's own validation KL (the ARA-vs-DIM comparison).
3. Held-out: JailbreakBench (``--n`` prompts, greedy, ``--tokens`` new tokens, no early stop) judged by every
   judge in ``--judges``; KL(original ‖ edited) on harmless_test: first token and mean over the first
   ``--kl-tokens`` tokens of the original model's greedy continuation, with bootstrap CIs.

Nothing is chosen on the prompts that are reported: strengths on the run's validation split, numbers on the
test sets. Writes ``OUT/validation.json`` (every validation evaluation), ``OUT/table.json`` (one row per edit)
and ``OUT/table.md``; the edits are saved in the run as ``edits/table_<row>``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from refusal_atlas.core.io import read_json, write_json, write_text
from refusal_atlas.data import load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import ActAdd, DirectionalAblation, Edit, LayerwiseAblation, NoEdit, StrengthKernel, load_edit
from refusal_atlas.evaluation.completions import completions_for
from refusal_atlas.evaluation.damage import continuation_kl, kl_records
from refusal_atlas.evaluation.evaluate import judged_record
from refusal_atlas.evaluation.judges import JudgeItem, JudgeOptions, make_judges
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.search.edit_space import EditSpace, build_edit
from refusal_atlas.search.sources import EditContext
from refusal_atlas.workflows.workspace import reopen_workspace


def machine_load() -> dict:
    return {"loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


class Validation:
    """Validation (refusal log-odds, KL) per edit fingerprint, cached in OUT/validation.json."""

    def __init__(self, ws, path: Path):
        s = ws.settings
        harmful = [p.instruction for p in load_prompts(s.data.harmful_val, n=s.data.n_val, seed=s.data.seed)]
        harmless = [p.instruction for p in load_prompts(s.data.harmless_val, n=s.data.n_val, seed=s.data.seed)]
        self.objective = ValidationObjective(ws.adapter, ws.chat, harmful, harmless, ws.refusal_ids,
                                             batch_size=s.model.batch_size)
        self.path = path
        self.cache: dict = read_json(path) if path.is_file() else {}
        self.meta = {"harmful": s.data.harmful_val, "harmless": s.data.harmless_val, "n": s.data.n_val,
                     "seed": s.data.seed, "refusal": "mean first-token refusal log-odds on the harmful prompts",
                     "kl": "mean next-token KL(original || edited) on the harmless prompts"}

    def __call__(self, row: str, strength: float, edit: Edit) -> dict:
        key = edit.fingerprint() if edit.kind != "none" else "none"
        if key not in self.cache:
            start = time.perf_counter()
            refusal, kl = self.objective(edit) if edit.kind != "none" else (self.objective.baseline()["refusal"], 0.0)
            self.cache[key] = {"row": row, "strength": strength, "refusal": refusal, "kl": kl,
                               "seconds": round(time.perf_counter() - start, 1)}
            write_json(self.path, {**self.cache, "_meta": self.meta})
            print(f"  val {row} s={strength:.4g}: refusal {refusal:.3f} KL {kl:.5f}", flush=True)
        return self.cache[key]


def match_strength(row: str, make: Callable[[float], Edit], lo: float, hi: float, target: float, val: Validation,
                   grid: tuple[float, ...], steps: int = 3) -> tuple[float, dict]:
    """The strength in [lo, hi] whose validation KL is nearest ``target`` (in log KL): grid, then secant steps on
    sqrt(KL) between the two evaluated strengths that bracket the target."""
    seen: dict[float, dict] = {}

    def score(s: float) -> dict:
        s = round(min(max(s, lo), hi), 4)
        if s not in seen:
            seen[s] = val(row, s, make(s))
        return seen[s]

    for s in grid:
        score(s)
    for _ in range(steps):
        pts = sorted((s, math.sqrt(max(r["kl"], 0.0))) for s, r in seen.items())
        t = math.sqrt(target)
        below = [p for p in pts if p[1] <= t]
        above = [p for p in pts if p[1] > t]
        if below and above:
            (s0, k0), (s1, k1) = below[-1], above[0]
            guess = s0 + (t - k0) * (s1 - s0) / (k1 - k0) if k1 > k0 else (s0 + s1) / 2
        elif above:  # everything too strong: go toward lo
            s1, k1 = above[0]
            guess = s1 * t / k1 if k1 > 0 else lo
        else:  # everything too weak: extrapolate toward hi
            s0, k0 = below[-1]
            guess = s0 * t / k0 if k0 > 0 else hi
        if round(min(max(guess, lo), hi), 4) in seen:
            break
        score(guess)

    def miss(item):
        return abs(math.log(max(item[1]["kl"], 1e-12)) - math.log(max(target, 1e-12)))

    best = min(seen.items(), key=miss)
    return best[0], {"evaluated": sorted((s, r["kl"], r["refusal"]) for s, r in seen.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ara", default=None, help="a trained low-rank edit of the run (edits/NAME)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kl-tokens", type=int, default=16)
    ap.add_argument("--judges", default="substring,meaning")
    ap.add_argument("--rows", default=None, help="only these rows (comma-separated names)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = machine_load()
    ws = reopen_workspace(args.run_dir)
    run, adapter, chat = ws.run, ws.adapter, ws.chat
    dim = DirectionSet.load(run.direction_path("dim"))
    ctx = EditContext.from_run(run.path)
    space = EditSpace.for_context(ctx)
    n_layers = ctx.n_layers
    val = Validation(ws, args.out / "validation.json")

    def uniform(**flags) -> Callable[[float], Edit]:
        """Ablation of the DIM direction at uniform strength s (the search's construction) with ``flags``."""
        def make(s: float) -> Edit:
            choice = space.decode(space.full_ablation_params(dim.layer, s))
            choice.update(flags)
            return build_edit(choice, ctx)
        return make

    som_ids: list[int] = []
    if run.direction_path("som").exists():
        som = DirectionSet.load(run.direction_path("som"))
        ctx.sets["som"] = som
        som_ids = list(som.ids[:3])  # SOM directions are ordered by hits: the three most populated neurons

    def som_set(mode: str) -> Callable[[float], Edit]:
        def make(s: float) -> Edit:
            choice = space.decode(space.full_ablation_params(dim.layer, s))
            choice.update(source="set:som", set="som", ids=som_ids, mode=mode)
            choice.pop("direction_index", None)
            return build_edit(choice, ctx)
        return make

    def kernel(s: float) -> Edit:
        """heretic's tent kernel: peak s at the DIM layer, falling to 0 at distance L/2, attn and mlp alike."""
        k = StrengthKernel(s, float(dim.layer), 0.0, n_layers / 2)
        return LayerwiseAblation.from_kernels(ctx.at_index(float(dim.layer), False).expand(n_layers, -1).contiguous(),
                                              k, k, meta={"method": "kernel"})

    def actadd(s: float) -> Edit:
        return ActAdd(dim.vectors[0], dim.layer, -s, meta={"method": "actadd"})

    reference = DirectionalAblation.from_directions(dim)
    rows: dict[str, dict] = {}
    target = val("dim_full", 1.0, reference)["kl"]
    base_val = val("none", 0.0, NoEdit())
    families: list[tuple[str, str, Callable[[float], Edit], float, float, tuple[float, ...], str]] = [
        ("actadd", "ActAdd −s·r_DIM at the DIM layer", actadd, 0.05, 2.0, (0.5, 1.0), "Arditi et al. 2024"),
        ("kernel", "layer-wise kernel (tent: peak s at the DIM layer, 0 at distance L/2)", kernel, 0.1, 3.0,
         (1.0, 1.5), "heretic 1.x"),
        ("projected", "uniform ablation, direction ⊥ harmless mean", uniform(projected=True), 0.1, 1.5, (0.5, 1.0),
         "grimjim / heretic"),
        ("norm_preserving", "uniform ablation, write norms kept", uniform(norm_preserving=True), 0.1, 1.5,
         (0.5, 1.0), "grimjim / heretic"),
        ("householder", "uniform reflection of the writes", uniform(transform="householder"), 0.05, 1.0,
         (0.25, 0.5), "abliterix 1.12"),
        ("biproject", "uniform ablation, direction ⊥ each written layer's harmless mean", uniform(transform="biproject"),
         0.1, 1.5, (0.5, 1.0), "grimjim / abliterix 1.12"),
        ("np_biproject", "projected + biprojected + norm-preserving (grimjim's full recipe)",
         uniform(projected=True, transform="biproject", norm_preserving=True), 0.1, 1.5, (0.5, 1.0), "grimjim"),
    ]
    if som_ids:
        families[:0] = [("som3_subspace", f"ablation of SOM neurons {som_ids} (subspace)", som_set("subspace"),
                         0.1, 1.5, (0.5, 1.0), "Piras et al. 2025 (SOM)"),
                        ("som3_sequential", f"ablation of SOM neurons {som_ids} (sequential rank-1)",
                         som_set("sequential"), 0.1, 1.5, (0.5, 1.0), "Piras et al. 2025 (SOM code)")]
    chosen: list[tuple[str, str, Edit, float | None, str, dict]] = [
        ("none", "no edit", NoEdit(), None, "-", {}),
        ("dim_full", "full directional ablation of r_DIM (hooks: block inputs and writes)", reference, 1.0,
         "Arditi et al. 2024", {}),
    ]
    keep = set(args.rows.split(",")) if args.rows else None

    def wanted(row: str) -> bool:
        """--rows: only these rows are matched (validation evaluations cost minutes each on the embedded model)."""
        return keep is None or row in keep

    for name, what, make, lo, hi, grid, tool in families:
        if not wanted(name):
            continue
        s, info = match_strength(name, make, lo, hi, target, val, grid)
        chosen.append((name, what, make(s), s, tool, info))
    householder_full = uniform(transform="householder")(1.0)
    chosen.append(("householder_s1", "full reflection of the writes (strength 1, the transform's definition)",
                   householder_full, 1.0, "abliterix 1.12", {}))
    if args.ara:
        ara = load_edit(run / "edits" / args.ara)
        ara_val = val("ara", 1.0, ara)
        chosen.append(("ara", f"ARA-style low-rank edit as trained (rank {ara.rank})", ara, 1.0,
                       "heretic ARA branch / 2.0", {}))
        if wanted("ara_scaled"):
            s, info = match_strength("ara_scaled", ara.scaled, 0.05, 3.0, target, val, (0.5, 1.0, 2.0))
            chosen.append(("ara_scaled", "the ARA update scaled to DIM full ablation's validation KL", ara.scaled(s),
                           s, "heretic ARA branch / 2.0", info))
        if wanted("dim_at_ara_kl"):
            s, info = match_strength("dim_at_ara_kl", uniform(), 0.1, 1.5, ara_val["kl"], val, (0.25, 0.5, 1.0))
            chosen.append(("dim_at_ara_kl", "uniform DIM ablation matched to the trained ARA edit's validation KL",
                           uniform()(s), s, "Arditi et al. 2024", {**info, "target_kl": ara_val["kl"]}))
    chosen = [c for c in chosen if wanted(c[0])]

    # --- held-out -----------------------------------------------------------------------------------
    s = ws.settings
    judges = make_judges(args.judges.split(","), JudgeOptions(cache_dir=run / "judgements", device=s.model.device))
    jbb = load_prompts("jailbreakbench", n=args.n, seed=s.data.seed)
    harmless = load_prompts("harmless_test", n=args.n, seed=s.data.seed)
    clean = completions_for(adapter, chat, harmless, NoEdit(), args.kl_tokens, s.evaluation.generation_batch_size,
                            run.completions_path("harmless_test", "none_kl"), desc="harmless_test [none]")
    conts = [ids[: args.kl_tokens] for ids in clean.token_ids]
    table_path = args.out / "table.json"
    done = {r["row"]: r for r in (read_json(table_path)["rows"] if table_path.is_file() else [])}
    for name, what, edit, strength, tool, info in chosen:
        if name != "none" and name != "dim_full":
            edit.name = f"table_{name}"
            edit.save(run / "edits" / edit.name)
        if name in done and done[name].get("fingerprint") == (edit.fingerprint() if edit.kind != "none" else None):
            rows[name] = done[name]
            continue
        start = time.perf_counter()
        comp = completions_for(adapter, chat, jbb, edit, args.tokens, s.evaluation.generation_batch_size,
                               run.completions_path("jailbreakbench", edit.label), desc=f"jailbreakbench [{name}]")
        items = [JudgeItem(p.instruction, r) for p, r in zip(jbb, comp.responses)]
        refusal = {}
        for judge in judges:
            rec = judged_record(edit, "jailbreakbench", "harmful", judge, judge.judge(items, "harmful"), comp.responses,
                                args.tokens)
            refusal[judge.name] = {k: rec.get(k) for k in ("rate", "ci95", "n", "count", "unclear", "empty_responses")}
        kl = {}
        if edit.kind != "none":
            per = continuation_kl(adapter, chat, [p.instruction for p in harmless], conts, edit,
                                  batch_size=max(1, s.model.batch_size // 2), desc=f"KL harmless_test [{name}]")
            kl = {r["metric"]: {"kl": r["kl"], "ci95": r["ci95"]} for r in kl_records(per, args.kl_tokens)}
        v = val(name, strength or 0.0, edit)
        rows[name] = {"row": name, "edit": what, "tool": tool, "edit_type": edit.edit_type, "label": edit.label,
                      "fingerprint": edit.fingerprint() if edit.kind != "none" else None,
                      "saved_as": getattr(edit, "name", None), "strength": strength, "strength_search": info,
                      "val_refusal": v["refusal"], "val_kl": v["kl"], "jailbreakbench": refusal, "harmless_test": kl,
                      "seconds": round(time.perf_counter() - start, 1)}
        write_json(table_path, {"rows": list(rows.values()), "meta": {}})
        print(f"{name}: " + ", ".join(f"{j} {r['rate']}" for j, r in refusal.items()) +
              (f"; KL {kl['kl_first_token']['kl']:.4f}" if kl else ""), flush=True)
    meta = {"run_dir": str(args.run_dir), "model": run.manifest().get("model", {}).get("name"),
            "dim_layer": dim.layer, "target_val_kl": target, "baseline_val": base_val, "validation": val.meta,
            "heldout": {"harmful": "jailbreakbench", "n": args.n, "max_new_tokens": args.tokens, "decoding": "greedy",
                        "stop_when_decided": False, "judges": args.judges.split(","), "kl": "harmless_test",
                        "kl_tokens": args.kl_tokens},
            "started": started, "finished": machine_load(), "python": platform.python_version(),
            "torch": torch.__version__, "command": " ".join([sys.executable, *sys.argv])}
    write_json(table_path, {"rows": list(rows.values()), "meta": meta})
    write_text(args.out / "table.md", to_markdown(list(rows.values()), args.judges.split(","), args.kl_tokens))
    print(to_markdown(list(rows.values()), args.judges.split(","), args.kl_tokens))
    return 0


def to_markdown(rows: list[dict], judges: list[str], kl_tokens: int) -> str:
    def rate(r: dict, judge: str) -> str:
        x = r["jailbreakbench"].get(judge) or {}
        if x.get("rate") is None:
            return "-"
        lo, hi = x["ci95"]
        return f"{x['rate']:.2f} [{lo:.2f}, {hi:.2f}]"

    def kl(r: dict, key: str) -> str:
        x = r["harmless_test"].get(key)
        return "0" if x is None else f"{x['kl']:.3f}"

    head = ["row", "strength", "val KL", *[f"JBB refusal ({j})" for j in judges], "KL 1st token", f"KL {kl_tokens} tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        multi = next((k for k in r["harmless_test"] if k.startswith("kl_first_") and k != "kl_first_token"), None)
        lines.append("| " + " | ".join([r["row"], "-" if r["strength"] is None else f"{r['strength']:.3g}",
                                        f"{r['val_kl']:.4f}", *[rate(r, j) for j in judges], kl(r, "kl_first_token"),
                                        kl(r, multi) if multi else "0"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
