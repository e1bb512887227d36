"""Do first-token KL and a capability task agree on how much an edit damages the model? (issue 27, item 3)

Reads a finished three-objective edit search (``search edits --objective refusal,kl,TASK``) and writes, from its
``search_edits.json`` alone:

* Spearman ρ between validation KL and task loss over every completed trial (and over the proxy front);
* the pairs of front trials that KL orders one way and the task loss the other (discordant pairs; a pair where
  either difference is below ``--tie`` counts as a tie, not a disagreement);

then, with ``--heldout`` (loads the run's model), scores the offline task's *test* part — items no search ever
scores — for the unedited model, full ablation of the run's DIM direction and ``search_best`` (``--front``: every
front edit too), so the task numbers that are reported were not the ones the search minimised.

    python scripts/capability_vs_kl.py --run-dir RUN --out DIR [--heldout [--front]]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from scipy.stats import spearmanr

from refusal_atlas.core.io import read_json, write_json


def agreement(summary: dict, tie: float) -> dict:
    trials = [t for t in summary["trials"] if t["state"] == "COMPLETE" and "task" in t]
    front = [t for t in summary["pareto"] if "task" in t]

    def rho(rows: list[dict]) -> float | None:
        if len(rows) < 3:
            return None
        return float(spearmanr([t["kl"] for t in rows], [t["task"] for t in rows]).statistic)

    pairs = []
    for a, b in itertools.combinations(sorted(front, key=lambda t: t["number"]), 2):
        dk, dt = b["kl"] - a["kl"], b["task"] - a["task"]
        if abs(dk) < tie or abs(dt) < tie:
            continue
        if dk * dt < 0:
            pairs.append({"a": a["number"], "b": b["number"], "kl": [a["kl"], b["kl"]], "task": [a["task"], b["task"]],
                          "accuracy": [(a.get("capability") or {}).get("accuracy"),
                                       (b.get("capability") or {}).get("accuracy")]})
    n_pairs = len(front) * (len(front) - 1) // 2
    return {"n_trials": len(trials), "n_front": len(front), "spearman_kl_task_trials": rho(trials),
            "spearman_kl_task_front": rho(front), "tie": tie, "front_pairs": n_pairs,
            "front_pairs_discordant": pairs,
            "trials": [{"number": t["number"], "origin": t.get("origin"), "refusal": t["refusal"], "kl": t["kl"],
                        "task": t["task"], "accuracy": (t.get("capability") or {}).get("accuracy"),
                        "on_front": t["number"] in set(summary["pareto_front"])} for t in trials]}


def heldout(run_dir: Path, summary: dict, front: bool) -> dict:
    """The task's test part under no edit, DIM full ablation, search_best and (``front``) every front edit."""
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.edits import DirectionalAblation, NoEdit, load_edit
    from refusal_atlas.evaluation.capability import ChoiceTask, load_task
    from refusal_atlas.workflows.workspace import reopen_workspace

    task_name = summary["settings"]["objectives"][2]
    ws = reopen_workspace(run_dir)
    items = load_task(task_name)["test"]
    task = ChoiceTask(ws.adapter, ws.chat, items, name=task_name, batch_size=ws.settings.model.batch_size)
    start = time.perf_counter()
    rows = [{"edit": "none", **task.baseline(), "loss": 0.0}]
    edits = {"dim_full_ablation": DirectionalAblation.from_directions(DirectionSet.load(ws.run.direction_path("dim")))}
    names = [f"search_trial_{t['number']}" for t in summary["pareto"]] if front else []
    edits.update({name: load_edit(run_dir / "edits" / name) for name in [*names, "search_best"]})
    for name, edit in edits.items():
        with edit.apply(ws.adapter):
            rows.append({"edit": name, **task.score()})
    with NoEdit().apply(ws.adapter):
        assert task.score()["loss"] == 0.0
    return {"task": task_name, "split": "test", "n_items": len(items), "rows": rows,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tie", type=float, default=1e-4, help="differences below this are ties (KL and task, nats)")
    ap.add_argument("--heldout", action="store_true", help="also score the task's test part (loads the model)")
    ap.add_argument("--front", action="store_true", help="with --heldout: every front edit too")
    args = ap.parse_args()
    summary = read_json(args.run_dir / "search_edits.json")
    if "task" not in summary.get("objectives", {}):
        raise SystemExit("error: not a three-objective search (search edits --objective refusal,kl,TASK)")
    out = agreement(summary, args.tie)
    print(f"{out['n_trials']} trials, {out['n_front']} on the 3-D front; Spearman rho(KL, task loss): trials "
          f"{out['spearman_kl_task_trials']}, front {out['spearman_kl_task_front']}; discordant front pairs: "
          f"{len(out['front_pairs_discordant'])} of {out['front_pairs']}")
    if args.heldout:
        out["heldout"] = heldout(args.run_dir, summary, args.front)
        for r in out["heldout"]["rows"]:
            print(f"  test part: {r['edit']:<18} loss {r['loss']:+.4f}  nll {r['nll']:.4f}  accuracy {r['accuracy']:.3f}")
    write_json(args.out / "agreement.json", out)


if __name__ == "__main__":
    main()
