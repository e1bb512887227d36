"""Side by side with heretic-llm 1.4.0, scored by heretic's own evaluator (issue 10, item 6).

Both tools get the same local copy of the model (the embedded model's converted fp32 folder by default),
the same prompts (our run's 256 + 256 harmful_train / harmless_train direction prompts; 100 JailbreakBench
prompts for refusals and 100 harmless_val prompts for KL, which both searches optimise on) and 32-token
greedy responses. Steps (each can be skipped; results are saved as JSON in --work and reused):

1. install heretic-llm==1.4.0 into its own venv under --work (torch==2.13.0 first; never our dependency);
2. write the prompt sets as ``datasets`` save_to_disk folders and heretic's config.toml;
3. run heretic's search headless (COLAB_GPU=1 makes its menus read stdin; stdin is a pipe we close, so
   its final menu ends on EOF after the study is saved), timestamping every output line: seconds per
   trial = from its "Running trial N" line to the next one (or to the end);
4. our side: extract + select (Python API) and ``refusal-atlas search`` on the same prompts, timed, with
   ``--budget`` = a third of heretic's wall time less our extract + select (or --our-trials N);
5. export our Pareto edits, those that could cover a heretic point first (``next_to_score``; at most
   --max-exports, none with validation KL above ``--kl-cap-factor`` × heretic's largest), and score each with
   ``heretic --model ORIGINAL --evaluate-model OURS``;
6. print seconds per trial (median) for both and the ratio, both fronts (refusals/100 @ KL), whether ours
   dominates heretic's (every heretic point (r, d) has one of ours with <= r and <= d, strictly better in
   one), and the wall-time ratio.

Takes 1–2 h on 2 CPU cores (heretic alone: 28 min for 24 trials on an Intel Xeon, 51 min on an AMD EPYC). Parts:
    .venv/bin/python bench/vs_heretic.py [--work bench_out/vs_heretic] [--heretic-trials 24] [--our-trials N]
        [--our-dtype bfloat16] [--our-max-kl 0.1] [--skip-heretic-search] (reuse WORK/heretic_search.json) [--skip-ours]
        [--max-exports 12] [--tries 3] [--install-only]
A rerun with --skip-heretic-search --skip-ours reuses every heretic evaluation that finished (its log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERETIC = "heretic-llm==1.4.0"
TORCH = "torch==2.13.0"
SYSTEM_PROMPT = "You are a helpful assistant."  # heretic's default system prompt; ours is set to the same
ROLES = {"bad_prompts": "harmful_train", "good_prompts": "harmless_train",
         "bad_evaluation_prompts": "harmful_val", "good_evaluation_prompts": "harmless_val"}
# how far above a heretic point's KL d our validation KL may be for the edit still to be scored against it
# (absolute, relative to d): the two KLs of one edit differed by 0.0002 at d = 0.004 and 0.0005 at d = 0.05
# (2026-12-06: 0.00390 vs 0.0037, 0.0532 vs 0.0527)
KL_SLACK = (0.0002, 0.01)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --- pure parts (unit-tested) ---------------------------------------------------------------------------
DATASET_SCRIPT = """
import json, sys
from datasets import Dataset
spec = json.load(open(sys.argv[1]))
for role, (path, prompts) in spec.items():
    Dataset.from_dict({"text": prompts}).save_to_disk(path)
"""


def write_datasets(prompts: dict[str, list[str]], root: Path, python: str = sys.executable) -> dict[str, Path]:
    """One ``datasets`` save_to_disk folder per heretic role (column ``text``), written by ``python``
    (heretic's venv, so its own ``datasets`` version writes them). Text files would split prompts on newlines."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {role: (str(root / role), list(texts)) for role, texts in prompts.items()}
    for role, (_, texts) in spec.items():
        if not texts:
            raise ValueError(f"no prompts for heretic's {role}")
    (root / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    subprocess.run([python, "-c", DATASET_SCRIPT, str(root / "spec.json")], check=True)
    return {role: Path(path) for role, (path, _) in spec.items()}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def heretic_config(datasets: dict[str, Path], counts: dict[str, int], *, n_trials: int, n_startup_trials: int,
                   seed: int, max_response_length: int, batch_size: int) -> str:
    """heretic's config.toml: the settings heretic_baseline.md measured with, every other key at its default."""
    top = {"dtypes": ["float32"], "batch_size": batch_size, "max_response_length": max_response_length,
           "n_trials": n_trials, "n_startup_trials": n_startup_trials, "seed": seed, "export_strategy": "merge",
           "response_prefix": "", "system_prompt": SYSTEM_PROMPT}
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for role in ROLES:
        lines += ["", f"[{role}]", f"dataset = {_toml(str(datasets[role]))}", f"split = {_toml(f'train[:{counts[role]}]')}",
                  'column = "text"']
    return "\n".join(lines) + "\n"


def _clean(line: str) -> str:
    return ANSI.sub("", line).rstrip("\r\n")


def parse_search_log(lines: list[tuple[float, str]]) -> dict:
    """heretic's search output, each line with the time it was read → trials (seconds, KL, refusals), the
    baseline refusals, set-up seconds and its Pareto front (its own rule: by refusals then KL, KL falling)."""
    trials: list[dict] = []
    base = n_bad = None
    t0 = lines[0][0] if lines else 0.0
    end = lines[-1][0] if lines else 0.0
    for t, raw in lines:
        line = _clean(raw)
        if m := re.search(r"Running trial (\d+) of (\d+)", line):
            if trials and trials[-1].get("end") is None:
                trials[-1]["end"] = t
            trials.append({"index": int(m.group(1)), "start": t, "end": None})
        elif m := re.search(r"Initial refusals: (\d+)/(\d+)", line):
            base, n_bad = int(m.group(1)), int(m.group(2))
        elif trials and (m := re.search(r"KL divergence: ([0-9.eE+-]+)", line)) and "[Trial" not in line:
            trials[-1]["kl"] = float(m.group(1))
        elif trials and trials[-1].get("kl") is None and (m := re.search(r"^\s*\* ([\w.]+) = (.+?)\s*$", line)):
            trials[-1].setdefault("params", {})[m.group(1)] = m.group(2)  # "* attn.o_proj.max_weight = 1.09"
        elif trials and (m := re.search(r"^\s*\* Refusals: (\d+)/(\d+)", line)):
            trials[-1]["refusals"] = int(m.group(1))
            n_bad = int(m.group(2))
        elif "Optimization finished!" in line:
            end = t
            if trials and trials[-1].get("end") is None:
                trials[-1]["end"] = t
    if trials and trials[-1].get("end") is None:
        trials[-1]["end"] = end
    done = [tr for tr in trials if "kl" in tr and "refusals" in tr]
    for tr in done:
        tr["seconds"] = tr["end"] - tr["start"]
    front = pareto([(tr["refusals"], tr["kl"]) for tr in done])
    return {"trials": done, "base_refusals": base, "n_bad": n_bad,
            "setup_s": (trials[0]["start"] - t0) if trials else None, "search_s": end - t0,
            "median_trial_s": statistics.median(tr["seconds"] for tr in done) if done else None,
            "front": [list(p) for p in front]}


HERETIC_COMPONENTS = {"attn": "attn.o_proj", "mlp": "mlp.down_proj"}


def heretic_choice(params: dict[str, str]) -> dict:
    """heretic's trial parameters (as its log prints them) → the same edit as a choice of our search space.

    Layer numbers are taken as they are: scored by heretic's evaluator, heretic's trial 14 rebuilt this way
    gave KL 0.0583 where heretic's own edit gave 0.0602 (2026-12-02), one layer later 0.0508.
    """
    index = params["direction_index"]
    choice: dict = {"projected": False, "norm_preserving": False, "embed": False}
    if index == "per layer":  # each block its own direction
        choice["source"] = "dim:per_layer"
    else:
        choice.update(source="dim:index", direction_index=float(index))
    for ours, theirs in HERETIC_COMPONENTS.items():
        choice[ours] = {"peak": float(params[f"{theirs}.max_weight"]),
                        "position": float(params[f"{theirs}.max_weight_position"]),
                        "floor": float(params[f"{theirs}.min_weight"]),
                        "distance": float(params[f"{theirs}.min_weight_distance"])}
    return choice


def read_logged(log: Path) -> list[tuple[float, str]]:
    """A log written by :func:`run_logged` → its (time, line) pairs."""
    out = []
    for raw in log.read_text(encoding="utf-8").splitlines():
        t, _, line = raw.partition(" ")
        out.append((float(t), line))
    return out


def parse_evaluation(lines: list[str]) -> dict:
    """``heretic --model A --evaluate-model B`` output → refusals, prompts, KL and A's baseline refusals."""
    out: dict = {}
    for raw in lines:
        line = _clean(raw)
        if m := re.search(r"Initial refusals: (\d+)/(\d+)", line):
            out["base_refusals"] = int(m.group(1))
        elif m := re.search(r"^\s*\* KL divergence: ([0-9.eE+-]+)", line):
            out["kl"] = float(m.group(1))
        elif m := re.search(r"^\s*\* Refusals: (\d+)/(\d+)", line):
            out["refusals"], out["n"] = int(m.group(1)), int(m.group(2))
    if "kl" not in out or "refusals" not in out:
        raise ValueError("heretic's evaluation printed no 'KL divergence' / 'Refusals' line")
    return out


def pareto(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """heretic's front rule: sort by (refusals, KL) and keep each point whose KL is below all before it."""
    front, best = [], float("inf")
    for r, d in sorted(points):
        if d < best:
            front.append((r, d))
            best = d
    return front


def dominance(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> dict:
    """Does our front dominate theirs: for every heretic point (r, d) one of ours with <= r and <= d, strictly
    better in at least one? Returns the verdict and, per heretic point, the first of ours that does it."""
    cover = []
    for r, d in theirs:
        hit = next((list(o) for o in sorted(ours) if o[0] <= r and o[1] <= d and (o[0] < r or o[1] < d)), None)
        cover.append({"heretic": [r, d], "ours": hit})
    return {"dominates": bool(theirs) and all(c["ours"] is not None for c in cover), "cover": cover}


def plot_fronts(result: dict, path: Path) -> Path:
    """Both tools' trials and fronts in heretic's own units (refusals/100 vs KL, log scale), with the
    unedited model's refusals: where one front lies below and left of the other, it does better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heretic, n = result["heretic"], result["heretic"].get("n_bad") or 100
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tr = [t for t in heretic["trials"] if t["kl"] > 0]
    ax.scatter([t["kl"] for t in tr], [t["refusals"] for t in tr], s=14, color="tab:orange", alpha=0.35,
               label=f"heretic trials ({len(heretic['trials'])})")
    for pts, color, label in ((heretic["front"], "tab:orange", "heretic front"),
                              (result["our_front"], "tab:blue", "our front (exported, scored by heretic)")):
        pts = sorted(pts, key=lambda p: p[1])
        ax.step([p[1] for p in pts], [p[0] for p in pts], where="post", color=color, marker="o", label=label)
    sc = [s for s in result["ours_scored"] if s["kl"] > 0]
    ax.scatter([s["kl"] for s in sc], [s["refusals"] for s in sc], s=14, color="tab:blue", alpha=0.35)
    if heretic.get("base_refusals") is not None:
        ax.axhline(heretic["base_refusals"], color="grey", ls=":", label="unedited model")
    ax.set_xscale("log")
    ax.set_xlabel("KL divergence of the first token on 100 harmless prompts (heretic's evaluator, log scale)")
    ax.set_ylabel(f"refusals / {n} JailbreakBench prompts")
    verdict = "dominates" if result["dominance"]["dominates"] else "does not dominate"
    ax.set_title(f"ours vs heretic-llm 1.4.0 (lower-left is better): ours {verdict}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the runs ---------------------------------------------------------------------------------------------
def run_logged(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> tuple[int, list[tuple[float, str]]]:
    """Run ``cmd`` with stdin a closed pipe, echo and keep every output line with the time it arrived."""
    lines: list[tuple[float, str]] = []
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # heretic's menus read stdin: EOF at the final menu ends it after the study is saved
        for line in proc.stdout:
            t = time.monotonic()
            lines.append((t, line))
            fh.write(f"{t:.3f} {line}")
            sys.stdout.write(line)
        return proc.wait(), lines


def install_heretic(venv: Path) -> Path:
    """heretic in its own venv (torch==2.13.0 first, then heretic with torch pinned) → its console script."""
    exe = venv / "bin" / "heretic"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, HERETIC, TORCH], check=True)
    return exe


def heretic_env() -> dict:
    return {"COLAB_GPU": "1", "PYTHONUNBUFFERED": "1", "TERM": "dumb", "NO_COLOR": "1"}


def our_config(args, model_dir: Path, n_val: int):
    """Our run's config: the same model folder, prompt counts, system prompt and response length as heretic's
    (``n_val``: the validation prompts per side of this step)."""
    from refusal_atlas.settings import load_settings

    return load_settings(None, dict(model=str(model_dir), n_train=args.n_dir, n_val=n_val, filter_train=False,
                                  harmful_val="jailbreakbench", harmless_val="harmless_val", system_prompt=SYSTEM_PROMPT,
                                  max_new_tokens=args.tokens, seed=0))


def our_prompts(args, model_dir: Path) -> dict[str, list[str]]:
    """heretic's four prompt roles, taken from our run's prompt sets (no model is loaded)."""
    from refusal_atlas.workflows.workspace import load_prompt_sets

    sets = load_prompt_sets(our_config(args, model_dir, args.n_eval))
    return {role: [p.instruction for p in getattr(sets, ours)] for role, ours in ROLES.items()}


def search_budget(args, heretic_wall_s: float | None, prep_s: float) -> str:
    """`refusal-atlas search --budget`: --our-trials if given, else a third of heretic's wall time minus our
    extract + select time and one trial's worth of margin (the loop starts no trial after its deadline, but
    the last one runs to its end)."""
    if args.our_trials:
        return str(args.our_trials)
    if heretic_wall_s is None:
        raise SystemExit("error: without heretic's wall time (--skip-heretic-search needs WORK/heretic_search.json) "
                         "pass --our-trials")
    seconds = heretic_wall_s / 3 - prep_s - args.trial_margin_s
    if seconds < 60:
        raise SystemExit(f"error: a third of heretic's wall time ({heretic_wall_s / 3:.0f} s) leaves {seconds:.0f} s "
                         f"after our extract + select ({prep_s:.0f} s); pass --our-trials")
    return f"{int(seconds)}s"


def our_side(args, work: Path, model_dir: Path, heretic_wall_s: float | None) -> dict:
    """Extract + select (Python API; selection on the first --n-select validation prompts, as `run` does),
    then `refusal-atlas search` on all --n-eval of them (heretic's sets) within its budget."""
    from refusal_atlas.workflows.run import build_direction

    run = work / "ours" / "run"
    t0 = time.monotonic()
    ws, _, _ = build_direction(our_config(args, model_dir, args.n_select), run, resume=True, allow_low_refusal=True)
    prep_s = time.monotonic() - t0
    del ws
    budget = search_budget(args, heretic_wall_s, prep_s)
    print(f"our extract + select took {prep_s:.0f} s; searching with --budget {budget}", flush=True)
    t1 = time.monotonic()
    subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "search", "edits", "-r", str(run), "--budget", budget,
                    "--n-val", str(args.n_eval), *(["--dtype", args.our_dtype] if args.our_dtype else []),
                    *(["--max-kl", str(args.our_max_kl)] if args.our_max_kl else [])], check=True)
    search_s = time.monotonic() - t1
    summary = json.loads((run / "search_edits.json").read_text())
    trials = [t for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED") and t.get("end")]
    from datetime import datetime

    secs = [(datetime.fromisoformat(t["end"]) - datetime.fromisoformat(t["start"])).total_seconds() for t in trials]
    complete = [s for s, t in zip(secs, trials) if t["state"] == "COMPLETE"]
    return {"prep_s": prep_s, "search_s": search_s, "budget": budget, "search_dtype": args.our_dtype or "float32",
            "max_kl": args.our_max_kl or None,
            "median_trial_s": statistics.median(secs),
            "median_complete_trial_s": statistics.median(complete) if complete else None,
            "n_pruned": sum(t["state"] == "PRUNED" for t in trials), "trial_s": secs,
            "pareto": [{"edit": p["edit_name"], "refusal": p["refusal"], "kl": p["kl"]} for p in summary["pareto"]],
            "run": str(run)}


def next_to_score(front: list[dict], theirs: list[tuple[int, float]], scored: list[dict], tries: int = 2,
                  max_exports: int = 12, kl_slack: tuple[float, float] = KL_SLACK) -> dict | None:
    """The next of our Pareto edits (sorted by validation KL) to score with heretic's evaluator, or None.

    Each scoring costs minutes, so the edits that decide the verdict go first: for the first heretic point
    (r, d) that no scored edit covers yet, our strongest unscored edit among the ``tries`` strongest with
    validation KL <= d + ``kl_slack`` (absolute + relative × d). Our validation KL is heretic's KL on the same
    prompts up to a few 1e-4, so an edit just above d may still score <= d; the verdict is heretic's number
    either way. At the strong end the trial's refusal score cannot resolve a few refusals, hence more than one
    try. When no uncovered point has a candidate left, the rest of the front, spread evenly over KL, until
    ``max_exports`` are scored.
    """
    if len(scored) >= max_exports:
        return None
    done = {s["edit"] for s in scored}
    points = [(s["refusals"], s["kl"]) for s in scored if s.get("refusals") is not None]
    for r, d in theirs:
        if dominance(points, [(r, d)])["dominates"]:
            continue
        reach = d + kl_slack[0] + kl_slack[1] * d
        left = [p for p in [p for p in front if p["kl"] <= reach][-tries:] if p["edit"] not in done]
        if left:
            return left[-1]
    rest = [p for p in front if p["edit"] not in done]
    if not rest:
        return None
    # spread: the unscored edit farthest (in KL rank) from every scored one
    ranks = {p["edit"]: i for i, p in enumerate(front)}
    taken = [ranks[e] for e in done if e in ranks]
    return max(rest, key=lambda p: min((abs(ranks[p["edit"]] - t) for t in taken), default=len(front) - ranks[p["edit"]]))


def finished_evaluation(log: Path, export: Path) -> dict | None:
    """A scoring that an earlier (killed) bench run finished: heretic's evaluation log of this export, if it
    is newer than the export and holds both result lines; else None (score it again)."""
    if not log.is_file() or not export.exists() or log.stat().st_mtime < export.stat().st_mtime:
        return None
    try:
        return {**parse_evaluation([line for _, line in read_logged(log)]), "rc": None, "reused_log": log.name}
    except ValueError:
        return None


def score_ours(args, work: Path, model_dir: Path, exe: Path, ours: dict, kl_cap: float | None = None,
               theirs: list[tuple[int, float]] | None = None) -> list[dict]:
    """Export our Pareto edits in ``next_to_score``'s order (at most --max-exports) and score each with
    heretic's evaluator.

    ``kl_cap``: edits whose validation KL is above it are not scored. Our validation KL is heretic's KL on the
    same prompts (2026-12-02: within 0.0002 in 11 of 12 pairs, the 12th, at KL 0.28, within 1 %), so an edit
    far above heretic's largest front KL cannot cover any heretic point, and each scoring costs minutes.
    """
    front = sorted((p for p in ours["pareto"] if kl_cap is None or p["kl"] <= kl_cap), key=lambda p: p["kl"])
    scored: list[dict] = []
    while (p := next_to_score(front, theirs or [], scored, tries=args.tries, max_exports=args.max_exports)) is not None:
        out = work / "ours" / "exports" / p["edit"]
        log = work / f"evaluate_{p['edit']}.log"
        evaluation = finished_evaluation(log, out)
        if evaluation is None:
            if not out.exists():
                subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "export", "-r", ours["run"], "--edit",
                                p["edit"], "--out", str(out)], check=True)
            rc, lines = run_logged([str(exe), "--model", str(model_dir), "--evaluate-model", str(out)],
                                   work / "heretic", log, heretic_env())
            evaluation = {**parse_evaluation([line for _, line in lines]), "rc": rc}
        ours_values = {"our_refusal_score": p["refusal"], "our_kl": p["kl"]}  # heretic's own values take the plain keys
        scored.append({**p, **ours_values, **evaluation})
        print(f"scored {p['edit']} (validation KL {p['kl']:.4f}): {scored[-1].get('refusals')} refusals @ KL "
              f"{scored[-1].get('kl')}", flush=True)
        (work / "ours_scored.json").write_text(json.dumps(scored, indent=1))
    return scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_out/vs_heretic")
    ap.add_argument("--model", default=None, help="local model folder (default: the embedded model's)")
    ap.add_argument("--heretic-trials", type=int, default=24)
    ap.add_argument("--heretic-startup", type=int, default=8)
    ap.add_argument("--our-trials", type=int, default=None,
                    help="our trials (default: search for a third of heretic's wall time, less our extract + select)")
    ap.add_argument("--trial-margin-s", type=float, default=60.0,
                    help="seconds kept back from our time budget for the last trial, which runs to its end")
    ap.add_argument("--n-dir", type=int, default=256, help="direction prompts per side")
    ap.add_argument("--n-eval", type=int, default=100, help="refusal (JailbreakBench) and KL (harmless_val) prompts")
    ap.add_argument("--n-select", type=int, default=32,
                    help="our DIM selection's validation prompts per side (the run default; the search uses --n-eval)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--our-dtype", default=None, help="dtype our search scores trials in (bfloat16: see docs/search.md); "
                                                     "extract, select and the exports stay float32, as heretic runs")
    ap.add_argument("--our-max-kl", type=float, default=0.1,
                    help="our search's KL cap (`search --max-kl`; 0: none). 0.1 is our pick rule's default KL bound "
                         "(--kl-threshold); heretic's fronts measured here all lie below it")
    ap.add_argument("--batch-size", type=int, default=64, help="heretic's batch size")
    ap.add_argument("--max-exports", type=int, default=12)
    ap.add_argument("--tries", type=int, default=3,
                    help="per uncovered heretic point (r, d), how many of our strongest edits with validation KL <= d "
                         "to score before moving on (at the strong end the trial score cannot resolve a few refusals)")
    ap.add_argument("--kl-cap-factor", type=float, default=1.5,
                    help="score only our edits with validation KL <= this × heretic's largest front KL (0: all)")
    ap.add_argument("--skip-heretic-search", action="store_true", help="reuse WORK/heretic_search.json")
    ap.add_argument("--skip-ours", action="store_true", help="reuse WORK/ours.json")
    ap.add_argument("--install-only", action="store_true")
    args = ap.parse_args()
    if args.max_exports < 2:
        ap.error("--max-exports must be >= 2")
    if args.tries < 1:
        ap.error("--tries must be >= 1")
    work = Path(args.work).resolve()
    checkpoints = work / "heretic" / "checkpoints"
    if not args.skip_heretic_search and not args.install_only and checkpoints.is_dir() and any(checkpoints.iterdir()):
        sys.exit(f"error: {checkpoints} holds an earlier heretic study (heretic would ask whether to reuse it); "
                 "pass --skip-heretic-search to reuse its result, or remove that folder for a fresh search")
    (work / "heretic").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    exe = install_heretic(work / "venv")
    print(f"heretic venv ready in {time.monotonic() - t0:.0f} s: {exe}")
    if args.install_only:
        return
    if args.model:
        model_dir = Path(args.model).resolve()
    else:
        from refusal_atlas.model.embedded import ensure_embedded_model

        model_dir = ensure_embedded_model()

    search_path = work / "heretic_search.json"
    if args.skip_heretic_search:
        heretic = json.loads(search_path.read_text())
    else:
        counts = {"bad_prompts": args.n_dir, "good_prompts": args.n_dir, "bad_evaluation_prompts": args.n_eval,
                  "good_evaluation_prompts": args.n_eval}
        datasets = write_datasets(our_prompts(args, model_dir), work / "datasets", str(work / "venv" / "bin" / "python"))
        (work / "heretic" / "config.toml").write_text(heretic_config(
            datasets, counts, n_trials=args.heretic_trials, n_startup_trials=args.heretic_startup, seed=42,
            max_response_length=args.tokens, batch_size=args.batch_size))
        rc, lines = run_logged([str(exe), "--model", str(model_dir)], work / "heretic", work / "heretic_search.log",
                               heretic_env())
        heretic = {**parse_search_log(lines), "rc": rc}
        if not heretic["trials"]:
            sys.exit(f"error: heretic's search finished no trial (exit {rc}); see {work / 'heretic_search.log'}")
        search_path.write_text(json.dumps(heretic, indent=1))

    ours_path = work / "ours.json"
    ours = json.loads(ours_path.read_text()) if args.skip_ours else our_side(args, work, model_dir, heretic["search_s"])
    ours_path.write_text(json.dumps(ours, indent=1))

    theirs = [tuple(p) for p in heretic["front"]]
    kl_cap = args.kl_cap_factor * max(d for _, d in theirs) if args.kl_cap_factor else None
    scored = score_ours(args, work, model_dir, exe, ours, kl_cap, theirs)
    our_front = pareto([(s["refusals"], s["kl"]) for s in scored])
    verdict = dominance(our_front, theirs)
    ratio = heretic["median_trial_s"] / ours["median_trial_s"]
    full_ratio = heretic["median_trial_s"] / (ours.get("median_complete_trial_s") or ours["median_trial_s"])
    our_wall = ours["prep_s"] + ours["search_s"]
    result = {"heretic": heretic, "ours": {k: v for k, v in ours.items() if k != "prompts"}, "ours_scored": scored,
              "our_front": [list(p) for p in our_front], "dominance": verdict, "trial_ratio": ratio,
              "complete_trial_ratio": full_ratio,
              "wall_ratio": heretic["search_s"] / our_wall}
    (work / "vs_heretic.json").write_text(json.dumps(result, indent=1))
    plot_fronts(result, work / "vs_heretic.png")
    n = heretic.get("n_bad") or args.n_eval
    fmt = lambda pts: ", ".join(f"{r}@{d:.4f}" for r, d in pts)  # noqa: E731
    print(f"\nseconds per trial (median): heretic {heretic['median_trial_s']:.1f} (float32), ours "
          f"{ours['median_trial_s']:.1f} ({ours.get('search_dtype', 'float32')}) → ours {ratio:.1f}x cheaper (goal >= 10)")
    print(f"  counting only our unpruned trials ({len(ours['trial_s']) - ours.get('n_pruned', 0)} of "
          f"{len(ours['trial_s'])}): {full_ratio:.1f}x")
    print(f"heretic front (refusals/{n} @ KL): {fmt(theirs)}")
    print(f"our front, scored by heretic     : {fmt(our_front)}")
    print(f"ours dominates heretic's front: {'YES' if verdict['dominates'] else 'NO'}")
    for c in verdict["cover"]:
        print(f"  heretic {c['heretic'][0]}@{c['heretic'][1]:.4f} ← ours {c['ours'] or 'none'}")
    print(f"wall time: heretic {heretic['search_s']:.0f} s (set-up + search), ours {our_wall:.0f} s (extract + select "
          f"{ours['prep_s']:.0f} s, search {ours['search_s']:.0f} s) → ratio {result['wall_ratio']:.2f} (goal >= 3)")
    print(f"saved {work / 'vs_heretic.json'} and {work / 'vs_heretic.png'}")


if __name__ == "__main__":
    main()
