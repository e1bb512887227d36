"""How many cached completions two or more models share, prompt for prompt, in a run directory.

    python scripts/compare_completions.py RUN_DIR DATASET LABEL [LABEL ...]

LABEL is an intervention label as it appears in metrics.json (``ablate:dim``,
``model:gguf:gguf_f16@ddcd78f5cc``, ...). For every label after the first: the number of prompts whose
response is identical to the first label's, out of the prompts both have. Used for the
"same completions" columns of docs/export.md: a weight export that equals its hook edit should
reproduce the hook completions, and a quantized one shows where rounding changes the greedy path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from refusal_atlas.evaluation.completions import read_completions
from refusal_atlas.core.rundir import RunDir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("dataset")
    ap.add_argument("labels", nargs="+")
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    answers = []
    for label in args.labels:
        path = run.completions_path(args.dataset, label)
        if not path.is_file():
            raise SystemExit(f"error: no completions for {label!r} on {args.dataset}: {path}")
        answers.append({r["instruction"]: r.get("response") for r in read_completions(path)})
    ref = answers[0]
    print(f"reference: {args.labels[0]} ({len(ref)} prompts)")
    for label, other in zip(args.labels[1:], answers[1:]):
        shared = ref.keys() & other.keys()
        same = sum(ref[k] == other[k] for k in shared)
        print(f"{label}: {same} of {len(shared)} identical")


if __name__ == "__main__":
    main()
