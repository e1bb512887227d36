"""One of heretic's trials rebuilt in our edit space: what our trial score says of it, and what heretic says.

After a ``bench/vs_heretic.py`` run, this reads heretic's search log in WORK and takes trial N's parameters
(direction index, the two strength kernels). It builds the same edit on our run's DIM candidates in
WORK/ours/run and scores it with our search's trial on the run's validation prompts (those both searches
used). It prints that next to our search's front. With ``--evaluate``, it also exports the edit and scores
it with heretic's own evaluator on the held-out prompts (WORK/heretic/eval/config.toml). This shows
whether a heretic point we miss lies inside our space and only our trial score ranks it low.

    .venv/bin/python bench/heretic_trial.py --work bench_out/vs_heretic_heldout --trial 14 [--evaluate]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import heretic_driver as hd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_out/vs_heretic_heldout")
    ap.add_argument("--trial", type=int, required=True, help="heretic's trial number (its 'Running trial N')")
    ap.add_argument("--evaluate", action="store_true", help="also export it and score it with heretic's evaluator")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    log, run = work / "heretic_search.log", work / "ours" / "run"
    for path, what in ((log, "heretic's search log"), (run / "search_edits.json", "our search")):
        if not path.exists():
            sys.exit(f"error: no {what} at {path}; run bench/vs_heretic.py --work {args.work} first")
    trials = {t["index"]: t for t in hd.parse_search_log(hd.read_logged(log))["trials"]}
    if args.trial not in trials or "params" not in trials[args.trial]:
        sys.exit(f"error: heretic trial {args.trial} is not in {log} (finished trials: {sorted(trials)})")
    theirs = trials[args.trial]
    choice = hd.heretic_choice(theirs["params"])

    from refusal_atlas.search.sources import EditContext
    from refusal_atlas.search.edit_space import build_edit
    from refusal_atlas.search.trial import StagedObjective
    from refusal_atlas.workflows.workspace import load_prompt_sets, reopen_workspace

    ws = reopen_workspace(run)
    sets = load_prompt_sets(ws.settings)
    objective = StagedObjective(ws.adapter, ws.chat, [p.instruction for p in sets.harmful_val],
                                [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                                batch_size=ws.settings.model.batch_size)
    edit = build_edit(choice, EditContext.from_run(run), name=f"heretic_trial_{args.trial}")
    refusal, kl = objective(edit)
    result = {"heretic_trial": args.trial, "params": theirs["params"], "choice": choice,
              "heretic": {"refusals": theirs["refusals"], "kl": theirs["kl"]},
              "our_trial": {"refusal": refusal, "kl": kl, "n": [len(sets.harmful_val), len(sets.harmless_val)]}}
    print(f"heretic trial {args.trial}: heretic's own edit {theirs['refusals']} refusals @ KL {theirs['kl']}")
    print(f"  rebuilt in our space, our trial score: refusal {refusal:.3f} @ KL {kl:.4f}")
    print("our search's front (our trial score):")
    for p in sorted(json.loads((run / "search_edits.json").read_text())["pareto"], key=lambda p: p["kl"]):
        print(f"  {p['edit_name']:<20} refusal {p['refusal']:.3f} @ KL {p['kl']:.4f}")
    if args.evaluate:
        edit.save(run / "edits" / edit.name)
        out = work / "ours" / "exports" / edit.name
        if not out.exists():
            subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "export", "-r", str(run), "--edit",
                            edit.name, "--out", str(out)], check=True)
        rc, lines = hd.drive([str(work / "venv" / "bin" / "heretic"), "--model", ws.settings.model.model,
                              "--evaluate-model", str(out)], work / "heretic" / "eval",
                             work / "logs" / f"evaluate_{edit.name}.log", None, hd.heretic_env())
        result["rebuilt_scored_by_heretic"] = {**hd.parse_evaluation([line for _, line in lines]), "rc": rc}
        r = result["rebuilt_scored_by_heretic"]
        print(f"  rebuilt, exported and scored by heretic's evaluator: {r['refusals']} refusals @ KL {r['kl']}")
    path = work / f"heretic_trial_{args.trial}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
