"""Distributed search throughput: N `refusal-atlas search` workers on one PostgreSQL study → trials per minute.

Starts a throw-away PostgreSQL server on loopback (tests/unit/postgres_server.py), builds a small run
directory (tiny random model, or the embedded model with --model embedded), then for each N in
--workers launches N worker processes on a fresh database, each adding --trials trials, and reports the
wall time from launch to the last exit (process start-up and model load included) and completed trials
per minute, both over that wall time and over the trial loop alone (first trial start to last trial end). Every worker uses its own copy of the run directory, as on separate machines.

    .venv/bin/python bench/search_workers.py [--model tiny|embedded] [--workers 1,2,4] [--trials 6] [--json OUT]

The workers run ``refusal-atlas search subsets --directions som``, whose study is named ``search-som``
(``search-<directions>``); the bench reads back the study of the directions it asked for, never a name of
its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit")]


def build_run(model: str, root: Path, n_val: int) -> Path:
    from refusal_atlas.workflows import verbs

    if model == "tiny":
        from refusal_atlas.model.saving import save_model_dir
        from tiny import TinyLoaded

        t = TinyLoaded("qwen2")
        save_model_dir(t.model, t.tokenizer, root / "model")
        model, layer = str(root / "model"), 2
    else:
        layer = 16
    run = root / "run"  # the verbs `extract`, `directions dim`, `select`, `directions som`, as the CLI runs them
    verbs.extract(run, dict(model=model, device="cpu", n_train=16, n_val=n_val, n_eval=4, max_new_tokens=2,
                            filter_train=False, layer=layer, batch_size=16))
    verbs.dim(run)
    verbs.select(run, {})
    verbs.som(run, grid="3x3", iterations=2000)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--trials", type=int, default=6, help="trials per worker")
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()
    directions = "som"
    from postgres_server import PostgresServer

    from refusal_atlas.search.storage import make_storage

    server, tmp = PostgresServer(), Path(tempfile.mkdtemp(prefix="bench-search-"))
    rows = []
    try:
        run = build_run(args.model, tmp, args.n_val)
        print(f"model {args.model}, {args.trials} trials per worker, n_val {args.n_val}, load avg {os.getloadavg()}")
        for n in [int(x) for x in args.workers.split(",")]:
            url = server.create_database(f"bench_{n}")
            dirs = []
            for i in range(n):
                d = tmp / f"w{n}_{i}"
                shutil.copytree(run, d, ignore=shutil.ignore_patterns("study.db*", "search.json"))
                dirs.append(d)
            cmd = ["search", "subsets", "--storage", url, "--directions", directions, "--k", "2", "--trials",
                   str(args.trials), "--seed", "0", "--n-startup-trials", "2", "--n-val", str(args.n_val), "--no-evaluate"]
            start = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-m", "refusal_atlas.cli", *cmd, "-r", str(d)],
                                      env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE) for d in dirs]
            errs = [p.communicate()[1] for p in procs]
            wall = time.perf_counter() - start
            bad = [e.decode()[-500:] for p, e in zip(procs, errs) if p.returncode]
            if bad:
                raise SystemExit(f"worker failed: {bad[0]}")
            study = optuna.load_study(study_name=f"search-{directions}", storage=make_storage(url))
            done = [t for t in study.trials if t.state.name == "COMPLETE"]
            evaluated = sum("reused_from" not in t.user_attrs for t in done)
            loop = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            rows.append({"workers": n, "trials": len(done), "evaluated": evaluated, "wall_s": wall, "loop_s": loop,
                         "load_avg": os.getloadavg()[0]})
            print(f"workers {n}: {len(done)} trials ({evaluated} evaluated, {len(done) - evaluated} reused) in "
                  f"{wall:.1f} s → {60 * len(done) / wall:.1f} trials/min with start-up; trial loop {loop:.1f} s → "
                  f"{60 * len(done) / loop:.1f} trials/min (load avg {os.getloadavg()[0]:.2f})")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "trials_per_worker": args.trials,
                                                   "n_val": args.n_val, "rows": rows}, indent=1))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
