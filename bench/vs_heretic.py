"""Held-out side by side with heretic-llm 1.4.0: both searches on validation prompts, every front point scored
on prompts neither saw, by heretic's evaluator and by ours (issue 28, item 1).

Design (the reasons are the issue's: the earlier bench scored both fronts on the prompts both searches had
optimised on, and compared our bf16 trial with heretic's fp32 one):

1. **Same inputs.** One local model folder (the embedded model's fp32 copy by default). Directions from the
   same train prompts: our run's ``harmful_train`` / ``harmless_train`` sample (256 + 256, unfiltered) is
   heretic's ``bad_prompts`` / ``good_prompts``. Both searches score trials on the run's validation prompts
   only: ``harmful_val`` (all 39) and a 100-prompt ``harmless_val`` sample, which are heretic's
   ``bad_evaluation_prompts`` / ``good_evaluation_prompts``. Same system prompt, greedy, ``--tokens`` (64)
   new tokens in heretic's trials and in every scoring; the same dtype (``--dtype``, float32: heretic's
   ``dtypes`` and our ``search --dtype``).
2. **Warm starts, a design choice fixed before any scoring**: our search starts, as every search of ours
   does, with the six fixed anchors of ``[search] anchors`` (full DIM ablation at strengths 1.0, 0.85,
   0.7, 0.5, 0.25, 0.12); nothing here is chosen from the held-out results. (History, said plainly: 0.85
   and 0.12 were added on 2026-12-06 after a run that scored on JailbreakBench, which is part of the
   held-out set here; the ``extra`` subset below — HarmBench test / StrongREJECT — never informed any choice.)
   heretic runs without warm starts: ``--heretic-trials`` (24), the first ``--heretic-startup`` (8) random, then TPE.
3. **heretic's front is heretic's own saved models**: its menus are driven (heretic_driver.MenuDriver) so
   that it saves the merged model of every trial on its Pareto front. Ours: each front trial's edit is
   exported with ``refusal-atlas export`` (safetensors).
4. **Held-out scoring** of every front point and of the unedited model: JailbreakBench (100) + ``--n-extra``
   (200) HarmBench-test / StrongREJECT prompts that are not exact or near duplicates of any train or
   validation prompt (heldout_prompts.py) for refusals; 100 ``harmless_test`` prompts for KL. Twice:
   - by heretic's own Evaluator (bench/heretic_evaluator.py, in heretic's venv, config pointing its
     evaluation roles at these sets; ``--cli-check`` compares one model with the real
     ``heretic --model ORIGINAL --evaluate-model M``): its marker rule, its first-token KL;
   - by ours: our generation (``--tokens`` greedy tokens) judged by ``substring``, ``markers`` (heretic's
     rule on our text) and ``meaning`` (the shipped head: refusal, with deflection beside it), and our KL
     (first token, with a bootstrap interval; 16 teacher-forced tokens beside it).
   Every rate has its 95% Wilson interval. Fronts are also read on two subsets: ``strict`` (without the 16
   JailbreakBench prompts that nearly duplicate a train or validation prompt) and ``extra``.
5. **Budgets are the setting, not a result.** heretic's wall time W (process start to "Optimization
   finished!": set-up + 24 trials) is measured first; our extract + select + search then runs for 1 × W,
   and the ⅓ × W front is read off the same search from its trial log (fronts.front_at: a trial counts
   only if it ended before the cut-off; the seeded sampler's proposals do not depend on the budget).
   Seconds per trial of both tools, same dtype, same machine, same run.
6. **Dominance** (fronts.py): which heretic points ours dominates by point estimates, and which with the
   95% intervals apart; and the same the other way round.

Every finished step is saved under --work and reused on a rerun (heretic's search and saved models; our
search; each export; each heretic and each our scoring, per model); ``--lock FILE`` takes that lock around
each heavy step and lets it go between them (do not also run the bench under ``flock FILE``). Our exports
are deleted once scored (``--keep-models`` keeps them); heretic's saved models are the only copies and stay.

Run on the embedded model (2026-12-07, 2 CPU cores, fp32): the two searches about 55 min; scoring about 5 min
per model per scorer on 300 + 100 prompts, so ~10 min a model. Scoring every front point (1 + 5 heretic + 44 of
ours there) is ~8 h; ``--our-points matched`` scores only our points that face a heretic point (8 there, ~2.3 h):
``.venv/bin/python bench/vs_heretic.py --work bench_out/vs_heretic_heldout --our-points matched [--lock FILE]``
(``--cli-check`` adds one run of the real ``heretic --evaluate-model``, ~10 min; ``--scored-only`` reports on
what is scored so far).
Pipeline check in minutes (says the code runs, nothing about either tool): ``--model DIR --heretic-trials 3
--heretic-startup 2 --n-dir 16 --n-val 8 --n-jbb 6 --n-extra 6 --n-harmless-test 6 --tokens 8 --our-search-s 30``.
Results: WORK/vs_heretic_heldout.json and .png (copy them to docs/results/data/).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import fronts
import heldout_prompts as hp
from heretic_driver import (MenuDriver, drive, heretic_config, heretic_env, install_heretic, parse_evaluation,
                            parse_search_log, read_logged, write_datasets)

BENCH = Path(__file__).resolve().parent
SYSTEM_PROMPT = "You are a helpful assistant."  # heretic's default system prompt; ours is set to the same
SEARCH_ROLES = {"bad_prompts": "harmful_train", "good_prompts": "harmless_train",
                "bad_evaluation_prompts": "harmful_val", "good_evaluation_prompts": "harmless_val"}
POOL = ("harmbench_test", "strongreject")
EXCLUDE = ("harmful_train", "harmful_val", "harmbench_val")  # every train / validation prompt (harmful_val ⊂ harmbench_val)
HARMLESS_SEEN = ("harmless_train", "harmless_val")  # the harmless splits our run and heretic draw from
JUDGES = ("substring", "markers", "meaning")
BUDGETS = {"1/3": 1 / 3, "1": 1.0}
KL_TOKENS = 16
PHASES = ("prompts", "heretic", "ours", "scores", "report")


# --- small helpers ----------------------------------------------------------------------------------------
def write_json(path: Path, data) -> Path:
    """Atomic: a killed bench never leaves half a result that a rerun would reuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def load_snapshot(work: Path, phase: str) -> dict:
    """Load average and the busiest processes now, appended to WORK/load.jsonl (what else was running)."""
    top = subprocess.run(["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True).stdout.splitlines()[:6]
    rec = {"phase": phase, "time": datetime.now().isoformat(timespec="seconds"), "loadavg": list(os.getloadavg()),
           "top": [line[:160] for line in top]}
    with open(work / "load.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(f"[{phase}] load average {rec['loadavg'][0]:.2f} {rec['loadavg'][1]:.2f} {rec['loadavg'][2]:.2f}", flush=True)
    return rec


@contextlib.contextmanager
def heavy(lock: str | None, work: Path, phase: str):
    """Hold ``lock`` (flock) for one heavy step, recording the load before and after."""
    fh = open(lock, "a") if lock else None
    try:
        if fh is not None:
            print(f"[{phase}] waiting for {lock}", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        load_snapshot(work, f"{phase}:start")
        yield
        load_snapshot(work, f"{phase}:end")
    finally:
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


# --- prompts ----------------------------------------------------------------------------------------------
def our_flags(args, model_dir: Path) -> dict:
    """Our run's settings, as the command line would give them: the same model folder, train / validation
    prompts, system prompt and length as heretic's."""
    return dict(model=str(model_dir), n_train=args.n_dir, n_val=args.n_val, filter_train=False,
                harmful_val="harmful_val", harmless_val="harmless_val", system_prompt=SYSTEM_PROMPT,
                max_new_tokens=args.tokens, seed=0)


def our_settings(args, model_dir: Path):
    from refusal_atlas.settings import load_settings

    return load_settings(None, our_flags(args, model_dir))


def prompt_key(args) -> dict:
    return {k: getattr(args, k) for k in ("n_dir", "n_val", "n_jbb", "n_extra", "n_harmless_test")}


def prepare_prompts(args, work: Path, model_dir: Path) -> dict:
    """Train / validation sets (heretic's four roles, from our run's sets) and the held-out sets → WORK/prompts.json."""
    path = work / "prompts.json"
    if path.exists():
        saved = read_json(path)
        if saved["key"] != prompt_key(args):
            sys.exit(f"error: {path} was made with {saved['key']}, not {prompt_key(args)}; use another --work")
        return saved
    from refusal_atlas.data import load_prompts
    from refusal_atlas.workflows.workspace import load_prompt_sets

    sets = load_prompt_sets(our_settings(args, model_dir))
    roles = {role: [p.instruction for p in getattr(sets, ours)] for role, ours in SEARCH_ROLES.items()}
    texts = lambda name, **kw: [p.instruction for p in load_prompts(name, **kw)]  # noqa: E731
    exclude = [(name, t) for name in EXCLUDE for t in texts(name)]
    pool = [(name, t) for name in POOL for t in texts(name)]
    t = time.monotonic()
    heldout = hp.heldout_set(texts("jailbreakbench")[: args.n_jbb], pool, exclude, args.n_extra, seed=0)
    print(f"held-out set: {len(heldout['prompts'])} prompts ({heldout['survivors']} of {heldout['pool']} pool prompts "
          f"survive the near-duplicate check; {time.monotonic() - t:.0f} s)", flush=True)
    harmless_test = texts("harmless_test", n=args.n_harmless_test, seed=0)
    check_disjoint(heldout, harmless_test, roles, {name: texts(name) for name in (*EXCLUDE, *HARMLESS_SEEN)})
    out = {"key": prompt_key(args), "roles": roles, "heldout": heldout, "harmless_test": harmless_test,
           "sources": {"roles": SEARCH_ROLES, "pool": POOL, "exclude": EXCLUDE, "harmless_seen": HARMLESS_SEEN,
                       "harmless_test": "harmless_test"}}
    return write_json(path, out) and out


def check_disjoint(heldout: dict, harmless_test: list[str], roles: dict[str, list[str]],
                   splits: dict[str, list[str]]) -> None:
    """Stop (one ``error:`` line) if a prompt that scores the fronts is one a search saw: the extra harmful
    prompts must not nearly duplicate any search role's prompt or any prompt of the train / validation splits
    (``splits``), and no harmless_test prompt may equal one of them. JailbreakBench is kept whole by design;
    its near duplicates are marked (``near``) and left out of the ``strict`` subset."""
    extra = [p["text"] for p in heldout["prompts"] if p["source"] != "jailbreakbench"]
    harmful_seen = {**{r: roles[r] for r in ("bad_prompts", "bad_evaluation_prompts")},
                    **{name: splits[name] for name in EXCLUDE}}
    found = hp.leaks({"extra": extra}, harmful_seen, near=True)
    found += hp.leaks({"harmless_test": harmless_test}, {**roles, **splits})
    found += [{"set": "jailbreakbench", "text": p["text"], "seen_in": "(unmarked)"} for p in heldout["prompts"]
              if p["source"] == "jailbreakbench" and p["near"] is None and hp.leaks({"j": [p["text"]]}, harmful_seen)]
    if found:
        f = found[0]
        sys.exit(f"error: {len(found)} held-out prompt(s) were seen by a search, e.g. {f['set']} "
                 f"{f['text'][:80]!r} in {f['seen_in']}")


# --- heretic's search -------------------------------------------------------------------------------------
def model_saved(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def heretic_search(args, work: Path, exe: Path, model_dir: Path, prompts: dict) -> dict:
    """heretic's search on the validation prompts, then its menus driven to save every Pareto trial's merged
    model → WORK/heretic_search.json. A rerun after the search finished only saves what is missing."""
    path = work / "heretic_search.json"
    if path.exists():
        return read_json(path)
    root, python = work / "heretic", str(work / "venv" / "bin" / "python")
    sdir = root / "search"
    sdir.mkdir(parents=True, exist_ok=True)
    roles = prompts["roles"]
    datasets = write_datasets(roles, work / "datasets" / "search", python)
    config = heretic_config(datasets, {r: len(v) for r, v in roles.items()}, n_trials=args.heretic_trials,
                            n_startup_trials=args.heretic_startup, seed=42, max_response_length=args.tokens,
                            batch_size=args.batch_size, dtype=args.dtype, system_prompt=SYSTEM_PROMPT)
    (sdir / "config.toml").write_text(config)
    log = work / "heretic_search.log"
    checkpoints = sdir / "checkpoints"
    resumed = checkpoints.is_dir() and any(checkpoints.iterdir())
    if resumed and not (log.exists() and parse_search_log(read_logged(log))["finished"]):
        sys.exit(f"error: {checkpoints} holds a heretic study whose search did not finish in {log}: its wall time "
                 "cannot be measured; remove WORK/heretic and WORK/heretic_search.log for a fresh search")
    driver = MenuDriver(root / "models")
    for d in (root / "models").glob("trial_*"):
        index = int(d.name.split("_")[1])
        if model_saved(d):
            driver.saved[index] = str(d)
        else:
            shutil.rmtree(d)  # a save that was killed half-way
    cmd = [str(exe), "--model", str(model_dir)]
    rc, lines = drive(cmd, sdir, work / "heretic_save.log" if resumed else log, driver, heretic_env())
    parsed = parse_search_log(read_logged(log) if resumed else lines)
    if not parsed["finished"] or not parsed["trials"]:
        sys.exit(f"error: heretic's search did not finish (exit {rc}); see {log}")
    missing = sorted(set(driver.front) - set(driver.saved))
    if missing or not driver.front:
        sys.exit(f"error: heretic saved no model for front trials {missing or 'all'} (exit {rc}; failures: "
                 f"{driver.failed}); see {log}")
    menu = sorted((v["refusals"], round(v["kl"], 4)) for v in driver.front.values())
    logged = sorted((r, round(d, 4)) for r, d in parsed["front"])
    out = {**parsed, "rc": rc, "resumed_to_save": resumed, "config": config, "command": cmd,
           "menu_front": {str(k): v for k, v in sorted(driver.front.items())},
           "menu_front_matches_log": menu == logged, "saved": {str(k): v for k, v in sorted(driver.saved.items())},
           "n_good": len(roles["good_evaluation_prompts"]), "dtype": args.dtype, "max_response_length": args.tokens}
    return write_json(path, out) and out


# --- our search -------------------------------------------------------------------------------------------
def trial_seconds(trials: list[dict]) -> list[tuple[str, float]]:
    return [(t["state"], (datetime.fromisoformat(t["end"]) - datetime.fromisoformat(t["start"])).total_seconds())
            for t in trials if t.get("state") in ("COMPLETE", "PRUNED") and t.get("start") and t.get("end")]


def our_search(args, work: Path, model_dir: Path, heretic: dict) -> dict:
    """Extract + select (Python API), then ``refusal-atlas search edits`` for 1 × heretic's wall time less
    that; the front at each budget read off its trial log → WORK/ours.json."""
    path = work / "ours.json"
    if path.exists():
        return read_json(path)
    from refusal_atlas.workflows import verbs

    run = work / "ours" / "run"
    if (run / "study.db").exists():
        sys.exit(f"error: {run / 'study.db'} holds an interrupted search of ours: its wall budget cannot be kept; "
                 "remove WORK/ours for a fresh one")
    if run.exists():
        shutil.rmtree(run)  # a set-up killed half-way: its time must be measured whole, so it starts again
    t0 = time.monotonic()  # the verbs `extract`, `directions dim`, `select` run, as the CLI runs them
    ws, _ = verbs.extract(run, our_flags(args, model_dir), allow_low_refusal=True)
    del ws
    gc.collect()
    verbs.dim(run)
    verbs.select(run, {})
    prep_s = time.monotonic() - t0
    gc.collect()
    wall = heretic["search_s"]
    try:
        allowed = {label: (f * args.our_search_s if args.our_search_s else fronts.search_seconds(wall, prep_s, f))
                   for label, f in BUDGETS.items()}
    except ValueError as exc:
        sys.exit(f"error: {exc}; give heretic more trials (or --our-search-s for a pipeline check)")
    budget = max(allowed.values())
    print(f"our extract + select took {prep_s:.0f} s; heretic's wall time {wall:.0f} s → searching for {budget:.0f} s",
          flush=True)
    cmd = [sys.executable, "-m", "refusal_atlas.cli", "search", "edits", "-r", str(run), "--budget",
           f"{math.ceil(budget)}s", "--n-val", str(args.n_val), "--dtype", args.dtype,
           *(["--max-kl", str(args.our_max_kl)] if args.our_max_kl else [])]
    launch, t1 = datetime.now(), time.monotonic()
    subprocess.run(cmd, check=True)
    search_s = time.monotonic() - t1
    summary = read_json(run / "search_edits.json")
    trials = summary["trials"]
    at = {label: fronts.front_at(trials, launch, s, args.our_max_kl or None) for label, s in allowed.items()}
    secs = trial_seconds(trials)
    complete = [s for state, s in secs if state == "COMPLETE"]
    out = {"run": str(run), "prep_s": prep_s, "search_s": search_s, "launch": launch.isoformat(),
           "command": cmd, "heretic_wall_s": wall, "allowed_search_s": allowed,
           "budget_override_s": args.our_search_s, "dtype": args.dtype, "max_kl": args.our_max_kl or None,
           "anchors": summary["settings"].get("anchors"), "n_trials": summary["n_trials"],
           "trials_by_budget": {label: fronts.trials_by(trials, launch, s) for label, s in allowed.items()},
           "median_trial_s": statistics.median(s for _, s in secs) if secs else None,
           "median_complete_trial_s": statistics.median(complete) if complete else None,
           "trial_s": [s for _, s in secs], "n_pruned": sum(state == "PRUNED" for state, _ in secs),
           "fronts": {label: [{"number": t["number"], "refusal": t["refusal"], "kl": t["kl"], "choice": t["choice"]}
                              for t in front] for label, front in at.items()}}
    save_front_edits(run, out)
    return write_json(path, out) and out


def save_front_edits(run: Path, ours: dict) -> None:
    """edits/search_trial_N for every trial on any budget's front (the search saves only its final front's)."""
    from refusal_atlas.search.edit_space import build_edit
    from refusal_atlas.search.sources import EditContext

    ctx = None
    for front in ours["fronts"].values():
        for t in front:
            name = f"search_trial_{t['number']}"
            if not (run / "edits" / f"{name}.json").exists():
                ctx = ctx or EditContext.from_run(run)
                build_edit(t["choice"], ctx, name=name).save(run / "edits" / name)


# --- the models to score ----------------------------------------------------------------------------------
def model_list(work: Path, model_dir: Path, heretic: dict, ours: dict, points: str = "all") -> list[dict]:
    """The unedited model, heretic's front (its saved models) and the union of our budgets' fronts, or with
    ``points="matched"`` only our front points that face a heretic point (fronts.matched, on validation KLs)."""
    models = [{"name": "none", "tool": "none", "path": str(model_dir)}]
    kls = [heretic["menu_front"][i]["kl"] for i in heretic["saved"]]
    keep = None if points == "all" else {t["number"] for front in ours["fronts"].values() for t in fronts.matched(front, kls)}
    for index, path in heretic["saved"].items():
        v = heretic["menu_front"][index]
        models.append({"name": f"heretic_trial_{index}", "tool": "heretic", "trial": int(index), "path": path,
                       "val": {"refusals": v["refusals"], "n": v["n"], "kl": v["kl"]}})
    mine: dict[int, dict] = {}
    for label, front in ours["fronts"].items():
        for t in front:
            if keep is not None and t["number"] not in keep:
                continue
            m = mine.setdefault(t["number"], {
                "name": f"ours_trial_{t['number']}", "tool": "ours", "trial": t["number"], "budgets": [],
                "edit": f"search_trial_{t['number']}", "path": str(work / "ours" / "exports" / f"search_trial_{t['number']}"),
                "val": {"refusal_score": t["refusal"], "kl": t["kl"]}})
            m["budgets"].append(label)
    return models + [mine[n] for n in sorted(mine)]


def scored(work: Path, name: str, who: str) -> Path:
    return work / "scores" / f"{name}.{who}.json"


def fully_scored(work: Path, m: dict) -> bool:
    """Both scorers' results for model ``m`` are saved."""
    return scored(work, m["name"], "heretic").exists() and scored(work, m["name"], "ours").exists()


def export_ours(run: str, m: dict) -> None:
    out = Path(m["path"])
    if model_saved(out):
        return
    if out.exists():
        shutil.rmtree(out)
    subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "export", "-r", run, "--edit", m["edit"], "--out",
                    str(out)], check=True)


def heretic_eval_dir(args, work: Path, prompts: dict) -> Path:
    """heretic's config for scoring: its evaluation roles = the held-out harmful prompts and harmless_test."""
    edir = work / "heretic" / "eval"
    if (edir / "config.toml").exists():
        return edir
    python = str(work / "venv" / "bin" / "python")
    roles = dict(prompts["roles"])
    roles["bad_evaluation_prompts"] = [p["text"] for p in prompts["heldout"]["prompts"]]
    roles["good_evaluation_prompts"] = prompts["harmless_test"]
    datasets = write_datasets(roles, work / "datasets" / "heldout", python)
    config = heretic_config(datasets, {r: len(v) for r, v in roles.items()}, n_trials=1, n_startup_trials=1, seed=42,
                            max_response_length=args.tokens, batch_size=args.batch_size, dtype="float32",
                            system_prompt=SYSTEM_PROMPT)
    edir.mkdir(parents=True, exist_ok=True)
    (edir / "config.toml").write_text(config)
    return edir


class OurScorer:
    """Our generation + judges on the held-out harmful prompts, our KL on harmless_test, for any model folder
    (or the unedited model), against the run's original model and chat format."""

    def __init__(self, run: str, prompts: dict, tokens: int, work: Path):
        from refusal_atlas.data.loaders import Prompt
        from refusal_atlas.edits import NoEdit
        from refusal_atlas.evaluation.completions import completions_for
        from refusal_atlas.evaluation.judges import JudgeOptions, make_judges
        from refusal_atlas.workflows.workspace import reopen_workspace

        self.ws = reopen_workspace(run)
        self.tokens, self.sdir = tokens, work / "scores"
        self.harmful = [Prompt(p["text"]) for p in prompts["heldout"]["prompts"]]
        self.harmless = [Prompt(t) for t in prompts["harmless_test"]]
        self.judges = make_judges(list(JUDGES), JudgeOptions())
        self.batch = self.ws.settings.evaluation.generation_batch_size
        ref = completions_for(self.ws.adapter, self.ws.chat, self.harmless, NoEdit(), KL_TOKENS, self.batch,
                              self.sdir / "harmless_reference.jsonl", desc="reference continuations")
        self.reference = [ids[:KL_TOKENS] for ids in ref.token_ids]

    def score(self, m: dict) -> dict:
        from refusal_atlas.edits import NoEdit
        from refusal_atlas.evaluation.completions import completions_for
        from refusal_atlas.evaluation.damage import continuation_kl
        from refusal_atlas.evaluation.exported import ExportedModel, exported_kind, load_exported
        from refusal_atlas.evaluation.judges import JudgeItem, verdict_name
        from refusal_atlas.evaluation.stats import mean_record
        import torch

        ws, t0 = self.ws, time.monotonic()
        if m["tool"] == "none":
            spec, loaded = NoEdit(), None
        else:
            path = Path(m["path"])
            loaded = load_exported(path, dtype="float32")
            spec = ExportedModel(loaded.model, path, exported_kind(path))
        comp = completions_for(ws.adapter, ws.chat, self.harmful, spec, self.tokens, self.batch,
                               self.sdir / f"{m['name']}.completions.jsonl", desc=f"generate [{m['name']}]")
        gen_s = time.monotonic() - t0
        items = [JudgeItem(p.instruction, r) for p, r in zip(self.harmful, comp.responses)]
        judged = {}
        for judge in self.judges:
            verdicts = judge.judge(items, "harmful")
            judged[judge.name] = {"refused": [v.refused for v in verdicts], "labels": [verdict_name(v) for v in verdicts]}
        kl = continuation_kl(ws.adapter, ws.chat, [p.instruction for p in self.harmless], self.reference, spec,
                             batch_size=max(1, ws.settings.model.batch_size // 2))
        first = mean_record(kl[:, 0].tolist())
        multi = mean_record(torch.nanmean(kl[:, :KL_TOKENS], dim=1).tolist())
        del spec, loaded
        gc.collect()
        return {"name": m["name"], "n": len(items), "tokens": self.tokens, "judges": judged,
                "kl": first["mean"], "kl_ci": first["ci95"], f"kl_{KL_TOKENS}": multi["mean"],
                f"kl_{KL_TOKENS}_ci": multi["ci95"], "responses": comp.responses, "generation_s": gen_s,
                "seconds": time.monotonic() - t0}


def score_all(args, work: Path, exe: Path, model_dir: Path, prompts: dict, ours: dict, models: list[dict]) -> None:
    """Each model scored by heretic's evaluator and by ours, ``--chunk`` models per heavy step."""
    todo = [m for m in models if not fully_scored(work, m)]
    edir = heretic_eval_dir(args, work, prompts)
    for start in range(0, len(todo), args.chunk):
        chunk = todo[start: start + args.chunk]
        with heavy(args.lock, work, f"scores {chunk[0]['name']}..{chunk[-1]['name']}"):
            for m in chunk:
                if m["tool"] == "ours":
                    export_ours(ours["run"], m)
            jobs = [{"name": m["name"], "path": m["path"], "out": str(scored(work, m["name"], "heretic"))}
                    for m in chunk if not scored(work, m["name"], "heretic").exists()]
            if jobs:
                jobs_path = write_json(work / "scores" / "heretic_jobs.json", jobs)
                base = scored(work, "none", "heretic")  # the original's count, not generated again
                rc, _ = drive([str(work / "venv" / "bin" / "python"), str(BENCH / "heretic_evaluator.py"), "--model",
                               str(model_dir), str(jobs_path), *(["--baseline", str(base)] if base.exists() else [])], edir,
                              work / "logs" / f"heretic_eval_{chunk[0]['name']}.log", None, heretic_env())
                left = [j["name"] for j in jobs if not Path(j["out"]).exists()]
                if rc or left:
                    sys.exit(f"error: heretic's evaluator stopped (exit {rc}) before scoring {left}; see WORK/logs")
            mine = [m for m in chunk if not scored(work, m["name"], "ours").exists()]
            if mine:
                scorer = OurScorer(ours["run"], prompts, args.tokens, work)
                for m in mine:
                    write_json(scored(work, m["name"], "ours"), scorer.score(m))
                    print(f"our scoring of {m['name']} saved", flush=True)
                del scorer
                gc.collect()
            for m in chunk:
                if m["tool"] == "ours" and not args.keep_models and Path(m["path"]).exists():
                    shutil.rmtree(m["path"])


def cli_check(args, work: Path, exe: Path, model_dir: Path, models: list[dict]) -> dict:
    """The real ``heretic --model ORIGINAL --evaluate-model M`` on one saved heretic model, against the loop's numbers."""
    path = work / "cli_check.json"
    if path.exists():
        return read_json(path)
    m = next(m for m in models if m["tool"] == "heretic")
    with heavy(args.lock, work, "cli check"):
        rc, lines = drive([str(exe), "--model", str(model_dir), "--evaluate-model", m["path"]],
                          work / "heretic" / "eval", work / "logs" / "heretic_cli_check.log", None, heretic_env())
    cli = parse_evaluation([line for _, line in lines])
    loop = read_json(scored(work, m["name"], "heretic"))
    out = {"model": m["name"], "rc": rc, "cli": cli, "loop": {k: loop[k] for k in ("refusals", "n", "kl", "base_refusals")},
           "equal": cli["refusals"] == loop["refusals"] and abs(cli["kl"] - loop["kl"]) < 5e-5
           and cli.get("base_refusals") == loop["base_refusals"]}
    return write_json(path, out) and out


# --- the report -------------------------------------------------------------------------------------------
def point(m: dict, h: dict, o: dict, judge: str, mask: list[bool]) -> dict:
    """One model's held-out point under ``judge`` ("heretic": heretic's evaluator and KL; else our judge and
    our first-token KL with its interval) on the prompts ``mask`` keeps."""
    if judge == "heretic":
        refused, kl, kl_ci = h["verdicts"], h["kl"], None
    else:
        refused, kl, kl_ci = o["judges"][judge]["refused"], o["kl"], o["kl_ci"]
    count = sum(r for r, keep in zip(refused, mask) if keep)
    n = sum(mask)
    lo, hi = fronts.wilson(count, n)
    return {"name": m["name"], "refusals": count, "n": n, "rate": count / n, "ci95": [round(lo, 4), round(hi, 4)],
            "kl": kl, "kl_ci": kl_ci}


def report(args, work: Path, prompts: dict, heretic: dict, ours: dict, models: list[dict]) -> dict:
    """Both fronts on the held-out prompts by every judge, the dominance verdicts, seconds per trial, budgets."""
    plist = prompts["heldout"]["prompts"]
    masks = {s: hp.subset_mask(plist, s) for s in hp.SUBSETS}
    needed = [m["name"] for m in models if m["tool"] != "ours" and not fully_scored(work, m)]
    if needed:
        sys.exit(f"error: not scored yet: {', '.join(needed)} (the unedited model and heretic's front are needed "
                 "for any report)")
    table = []
    for m in (m for m in models if fully_scored(work, m)):
        h, o = read_json(scored(work, m["name"], "heretic")), read_json(scored(work, m["name"], "ours"))
        if h["prompts"] != [p["text"] for p in plist]:
            sys.exit(f"error: heretic scored {m['name']} on other prompts than WORK/prompts.json holds")
        row = {**{k: v for k, v in m.items() if k != "path"}, "heretic_kl": h["kl"], "our_kl": o["kl"],
               "our_kl_ci": o["kl_ci"], f"our_kl_{KL_TOKENS}": o[f"kl_{KL_TOKENS}"],
               "heretic_base_refusals": h["base_refusals"], "points": {},
               # the two scorers generate independently: heretic's marker rule on our text should give its verdicts
               "markers_agree": sum(a == b for a, b in zip(h["verdicts"], o["judges"]["markers"]["refused"]))}
        for subset, mask in masks.items():
            if any(mask):
                row["points"][subset] = {j: point(m, h, o, j, mask) for j in ("heretic", *JUDGES)}
        labels = o["judges"]["meaning"]["labels"]
        row["meaning_deflection"] = fronts.wilson(labels.count("deflection"), len(labels))
        row["meaning_deflections"] = labels.count("deflection")
        table.append(row)
    by = {r["name"]: r for r in table}
    theirs = [r for r in table if r["tool"] == "heretic"]
    verdicts = {}
    for subset in [s for s in hp.SUBSETS if any(masks[s])]:
        for judge in ("heretic", *JUDGES):
            for label in BUDGETS:
                mine = [r for r in table if r["tool"] == "ours" and label in r["budgets"]]
                verdicts[f"{subset}/{judge}/{label}"] = fronts.verdict([r["points"][subset][judge] for r in mine],
                                                                      [r["points"][subset][judge] for r in theirs])
    ours_s = ours["median_complete_trial_s"] or ours["median_trial_s"]
    result = {
        "date": datetime.now().date().isoformat(), "command": sys.argv, "machine": machine(),
        "settings": {**prompt_key(args), "tokens": args.tokens, "dtype": args.dtype, "heretic_trials": args.heretic_trials,
                     "heretic_startup": args.heretic_startup, "batch_size": args.batch_size, "our_max_kl": args.our_max_kl,
                     "kl_tokens": KL_TOKENS, "judges": JUDGES},
        "prompts": {"heldout_n": len(plist), "by_source": {s: sum(p["source"] == s for p in plist)
                                                          for s in {p["source"] for p in plist}},
                    "jbb_near_train_val": sum(p["near"] is not None for p in plist),
                    "pool": prompts["heldout"]["pool"], "survivors": prompts["heldout"]["survivors"],
                    "dropped": prompts["heldout"]["dropped"], "rule": prompts["heldout"]["rule"],
                    "jbb_near": [{"text": p["text"], "near": p["near"]} for p in plist if p["near"]],
                    "harmless_test_n": len(prompts["harmless_test"]), "sources": prompts["sources"]},
        "heretic": {k: heretic[k] for k in ("trials", "base_refusals", "n_bad", "n_good", "setup_s", "search_s",
                                            "median_trial_s", "front", "menu_front", "menu_front_matches_log", "dtype",
                                            "max_response_length", "config")},
        "ours": {k: v for k, v in ours.items() if k != "fronts"},
        "seconds_per_trial": {"heretic": heretic["median_trial_s"], "ours": ours["median_trial_s"],
                              "ours_complete": ours["median_complete_trial_s"], "dtype": args.dtype,
                              "ratio": heretic["median_trial_s"] / ours_s if ours_s else None},
        "budgets": {"heretic_wall_s": heretic["search_s"], "our_prep_s": ours["prep_s"],
                    "our_search_s_allowed": ours["allowed_search_s"], "our_search_process_s": ours["search_s"],
                    "trials_by_budget": ours["trials_by_budget"], "note": "the budget is the setting, not a result",
                    "fronts_read": "each budget's front is the proxy front of the trials that ended before its "
                                   "cut-off; the search's generation check of its final front ran after the 1x "
                                   "budget (inside our_search_process_s) and shapes neither front"},
        "our_points": our_points(args, ours, table),
        "models": table, "verdicts": verdicts, "baseline": by["none"]["points"],
        "cli_check": read_json(work / "cli_check.json") if (work / "cli_check.json").exists() else None,
        "load": [json.loads(line) for line in (work / "load.jsonl").read_text().splitlines()]
        if (work / "load.jsonl").exists() else [],
    }
    write_json(work / "vs_heretic_heldout.json", result)
    plot(result, work / "vs_heretic_heldout.png")
    print(format_report(result))
    return result


def our_points(args, ours: dict, table: list[dict]) -> dict:
    """Which of our front points were scored (``--our-points``), and per budget the ones that were not, so a
    verdict on a subset says so."""
    done = {r["trial"] for r in table if r["tool"] == "ours"}
    return {"rule": args.our_points, "scored": sorted(done),
            "unscored": {label: [t["number"] for t in front if t["number"] not in done]
                         for label, front in ours["fronts"].items()},
            "front_sizes": {label: len(front) for label, front in ours["fronts"].items()}}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _pt(p: dict) -> str:
    return f"{p['refusals']:>3}/{p['n']} [{p['ci95'][0]:.2f},{p['ci95'][1]:.2f}]"


def format_report(r: dict, subset: str = "all") -> str:
    """The printed table: each model's validation numbers and held-out refusals by every judge, KL, budgets."""
    lines = [f"held-out: {r['prompts']['heldout_n']} harmful prompts {r['prompts']['by_source']}, "
             f"{r['prompts']['harmless_test_n']} harmless_test; {r['settings']['tokens']} new tokens; subset {subset}",
             f"{'model':<18}{'budgets':<9}{'validation':<17}{'heretic evaluator':<24}{'KL(h)':>8}  "
             f"{'substring':<21}{'markers':<21}{'meaning':<21}{'KL(ours) [95%]':<24}{'KL16':>7}"]
    for m in r["models"]:
        p = m["points"][subset]
        val = ("-" if m["tool"] == "none" else f"{m['val']['refusals']}/{m['val']['n']}@{m['val']['kl']:.4f}"
               if m["tool"] == "heretic" else f"{m['val']['refusal_score']:.3f}@{m['val']['kl']:.4f}")
        lines.append(f"{m['name']:<18}{','.join(m.get('budgets', [])) or '-':<9}{val:<17}{_pt(p['heretic']):<24}"
                     f"{m['heretic_kl']:>8.4f}  {_pt(p['substring']):<21}{_pt(p['markers']):<21}{_pt(p['meaning']):<21}"
                     f"{m['our_kl']:.4f} [{m['our_kl_ci'][0]:.4f},{m['our_kl_ci'][1]:.4f}]  {m[f'our_kl_{KL_TOKENS}']:>7.4f}")
    lines.append("")
    agree = [m["markers_agree"] for m in r["models"] if "markers_agree" in m]
    if agree:
        lines.append(f"heretic's evaluator vs its marker rule on our generation: {min(agree)}–{max(agree)} of "
                     f"{r['prompts']['heldout_n']} verdicts agree per model")
    pts = r.get("our_points")
    if pts and any(pts["unscored"].values()):
        lines.append(f"our front points scored ({pts['rule']}): {len(pts['scored'])}; not scored: "
                     + ", ".join(f"{k}: {len(v)} of {pts['front_sizes'][k]}" for k, v in pts["unscored"].items())
                     + " (verdicts below are on the scored points only)")
    for key, v in r["verdicts"].items():
        if key.startswith(f"{subset}/") or key.startswith("strict/"):
            lines.append(f"{key:<26} ours dominates {v['heretic_dominated']}/{v['n_heretic']} heretic points by point "
                         f"estimates, {v['heretic_dominated_apart']} with intervals apart; heretic dominates "
                         f"{v['ours_dominated']}/{v['n_ours']} of ours ({v['ours_dominated_apart']} apart)")
    s, b = r["seconds_per_trial"], r["budgets"]
    ratio = f"{s['ratio']:.2f}" if s["ratio"] else "-"
    lines.append(f"\nseconds per trial (median, {s['dtype']}, same run): heretic {s['heretic']:.1f}, ours {s['ours']:.1f} "
                 f"(complete trials {s['ours_complete'] or float('nan'):.1f}) → ratio {ratio}")
    lines.append(f"wall budgets (the setting, not a result): heretic {b['heretic_wall_s']:.0f} s (set-up + search); ours "
                 f"extract + select {b['our_prep_s']:.0f} s + search "
                 + ", ".join(f"{k}: {v:.0f} s ({b['trials_by_budget'][k]} trials)" for k, v in b["our_search_s_allowed"].items()))
    if r.get("cli_check"):
        c = r["cli_check"]
        lines.append(f"heretic --evaluate-model on {c['model']}: {c['cli']['refusals']} refusals @ KL {c['cli']['kl']:.4f}; "
                     f"the evaluator loop: {c['loop']['refusals']} @ {c['loop']['kl']:.4f} → {'equal' if c['equal'] else 'DIFFERENT'}")
    return "\n".join(lines)


def plot(r: dict, path: Path, subset: str = "all") -> Path:
    """One panel per judge: refusal rate (95% Wilson bars) against KL (log), heretic's front and our two
    budgets' fronts, and the unedited model's rate: lower-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    judges = ("heretic", *JUDGES)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True)
    style = {"heretic": ("tab:orange", "o", "heretic front"), "1/3": ("tab:cyan", "s", "ours, ⅓ budget"),
             "1": ("tab:blue", "^", "ours, 1× budget")}
    for ax, judge in zip(axes.ravel(), judges):
        groups = {"heretic": [m for m in r["models"] if m["tool"] == "heretic"]}
        groups.update({b: [m for m in r["models"] if b in m.get("budgets", [])] for b in BUDGETS})
        for key, ms in groups.items():
            color, marker, label = style[key]
            pts = sorted((m["points"][subset][judge] for m in ms), key=lambda p: p["kl"])
            pts = [p for p in pts if p["kl"] > 0]
            if not pts:
                continue
            ax.errorbar([p["kl"] for p in pts], [p["rate"] for p in pts],
                        yerr=[[p["rate"] - p["ci95"][0] for p in pts], [p["ci95"][1] - p["rate"] for p in pts]],
                        fmt=marker, color=color, ms=5, capsize=2, alpha=0.8, label=label,
                        mfc="none" if key == "1/3" else color)
        base = r["baseline"][subset][judge]
        ax.axhline(base["rate"], color="grey", ls=":", label=f"unedited ({base['refusals']}/{base['n']})")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks overlap
        who = "heretic's evaluator (its markers, its KL)" if judge == "heretic" else f"our generation, {judge} judge"
        ax.set_title(who, fontsize=9)
        ax.set_xlabel("first-token KL on harmless_test" + (" (heretic's)" if judge == "heretic" else " (ours)"), fontsize=8)
        ax.set_ylabel(f"refusal rate, {base['n']} held-out harmful prompts", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"ours vs heretic-llm 1.4.0 on held-out prompts ({r['settings']['tokens']} tokens, lower-left is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_out/vs_heretic_heldout")
    ap.add_argument("--model", default=None, help="local model folder (default: the embedded model's)")
    ap.add_argument("--heretic-trials", type=int, default=24)
    ap.add_argument("--heretic-startup", type=int, default=8)
    ap.add_argument("--n-dir", type=int, default=256, help="direction (train) prompts per side")
    ap.add_argument("--n-val", type=int, default=100, help="validation prompts per side (harmful_val has 39)")
    ap.add_argument("--n-jbb", type=int, default=100, help="JailbreakBench prompts in the held-out set")
    ap.add_argument("--n-extra", type=int, default=200, help="held-out HarmBench test / StrongREJECT prompts")
    ap.add_argument("--n-harmless-test", type=int, default=100, help="harmless_test prompts for KL")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens in heretic's trials and in every scoring")
    ap.add_argument("--dtype", default="float32", help="both searches' dtype (heretic's dtypes, our search --dtype)")
    ap.add_argument("--batch-size", type=int, default=64, help="heretic's batch size")
    ap.add_argument("--our-max-kl", type=float, default=0.0, help="our search's KL cap (0: none, the default)")
    ap.add_argument("--our-search-s", type=float, default=0.0,
                    help="pipeline checks only: our 1× search seconds instead of heretic's wall time less our set-up")
    ap.add_argument("--our-points", choices=("all", "matched"), default="all",
                    help="our front points to score on held-out prompts: all, or those that face a heretic point "
                         "(the lowest validation refusal at no more validation KL than it; validation numbers only)")
    ap.add_argument("--chunk", type=int, default=6, help="models scored per heavy step")
    ap.add_argument("--lock", default=None, help="flock this file around each heavy step")
    ap.add_argument("--keep-models", action="store_true", help="keep our exports once scored")
    ap.add_argument("--cli-check", action="store_true",
                    help="also score one heretic model with the real `heretic --evaluate-model` and compare")
    ap.add_argument("--scored-only", action="store_true",
                    help="score nothing more: report on the points scored so far (the rest listed as not scored)")
    ap.add_argument("--until", choices=PHASES, default="report", help="stop after this phase")
    args = ap.parse_args(argv)
    for name in ("heretic_trials", "heretic_startup", "n_dir", "n_val", "n_jbb", "n_harmless_test", "tokens",
                 "batch_size", "chunk"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_extra < 0 or args.our_max_kl < 0 or args.our_search_s < 0:
        ap.error("--n-extra, --our-max-kl and --our-search-s must be >= 0")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        ap.error("--dtype must be float32, bfloat16 or float16")
    if args.lock and not Path(args.lock).exists():
        ap.error(f"--lock {args.lock} does not exist")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    exe = install_heretic(work / "venv")
    if args.model:
        model_dir = Path(args.model).resolve()
    else:
        from refusal_atlas.model.embedded import ensure_embedded_model

        model_dir = ensure_embedded_model()
    prompts = prepare_prompts(args, work, model_dir)
    if args.until == "prompts":
        return
    if not (work / "heretic_search.json").exists():
        with heavy(args.lock, work, "heretic search"):
            heretic = heretic_search(args, work, exe, model_dir, prompts)
    heretic = read_json(work / "heretic_search.json")
    if args.until == "heretic":
        return
    if not (work / "ours.json").exists():
        with heavy(args.lock, work, "our search"):
            our_search(args, work, model_dir, heretic)
    ours = read_json(work / "ours.json")
    if args.until == "ours":
        return
    models = model_list(work, model_dir, heretic, ours, args.our_points)
    if not args.scored_only:
        score_all(args, work, exe, model_dir, prompts, ours, models)
    if args.cli_check and not args.scored_only:
        cli_check(args, work, exe, model_dir, models)
    if args.until == "scores":
        return
    report(args, work, prompts, heretic, ours, models)
    print(f"saved {work / 'vs_heretic_heldout.json'} and {work / 'vs_heretic_heldout.png'}")


if __name__ == "__main__":
    main()
