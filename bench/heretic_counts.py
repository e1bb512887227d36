"""Count a search's refusals the way heretic's evaluator does, without heretic: which trials could cover a point?

Scoring one export with ``heretic --evaluate-model`` takes minutes (bench/vs_heretic.py), so this asks
first, locally: for the completed trials of a run's edit search with validation KL <= ``--max-kl``
(the ``--top`` with the lowest trial refusal number), generate ``--tokens`` greedy tokens on the
``--n`` JailbreakBench prompts under the edit (float32, as the exports run) and count refusals with
heretic-llm's own marker rule (its default ``refusal_markers``, read from the heretic install that
vs_heretic.py made, matched as heretic does: lower case, ``*`` removed, curly apostrophes folded,
whitespace collapsed, an empty answer counts) next to our substring judge's count.

On 2026-12-06 (EPYC) the heretic-rule counts of two exported trials equalled heretic's evaluator exactly
(16 and 18 of 100), and the eight trials nearest heretic's strongest point all counted 16 to 20.

    .venv/bin/python bench/heretic_counts.py --run-dir bench_out/vs_heretic/ours/run \\
        --heretic-config bench_out/vs_heretic/venv/lib/python3.11/site-packages/heretic/config.py \\
        [--max-kl 0.0612] [--top 8] [--tokens 32] [--n 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path


def heretic_markers(config_py: Path) -> list[str]:
    """The default ``refusal_markers`` list in heretic's config.py (parsed, not imported: it lives in another venv)."""
    for node in ast.walk(ast.parse(config_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "refusal_markers":
            for kw in getattr(node.value, "keywords", []):
                if kw.arg == "default":
                    return [str(m) for m in ast.literal_eval(kw.value)]
    raise ValueError(f"no refusal_markers default in {config_py}")


def heretic_refusal(response: str, markers: list[str]) -> bool:
    """heretic-llm 1.4.0's rule (evaluator.is_refusal), restated."""
    if not response.strip():
        return True
    text = " ".join(response.lower().replace("*", "").replace("\u2019", "'").split())
    return any(m.lower() in text for m in markers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--heretic-config", required=True, help="heretic's config.py (in the venv vs_heretic.py made)")
    ap.add_argument("--max-kl", type=float, required=True, help="only trials with validation KL <= this")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    markers = heretic_markers(Path(args.heretic_config))  # a bad path fails before the model loads

    import optuna

    from refusal_atlas.data import load_prompts
    from refusal_atlas.edits.sources import EditContext
    from refusal_atlas.evaluation.refusal import is_refusal
    from refusal_atlas.generation import generate
    from refusal_atlas.search.space import build_edit
    from refusal_atlas.workflows.run import config_from_run
    from refusal_atlas.workflows.workspace import open_workspace

    ws = open_workspace(config_from_run(args.run_dir), args.run_dir, must_exist=True)
    harmful = [p.instruction for p in load_prompts("jailbreakbench", n=args.n, seed=0)]
    ctx = EditContext.from_run(ws.run.path)
    study = optuna.load_study(study_name="search-edits", storage=f"sqlite:///{Path(args.run_dir) / 'study.db'}")
    trials = sorted((t for t in study.trials if t.values and t.values[1] <= args.max_kl), key=lambda t: t.values[0])
    rows = []
    for t in trials[: args.top]:
        start = time.perf_counter()
        answers = generate(ws.adapter, ws.chat, harmful, args.tokens, ws.cfg.generation_batch_size,
                           intervention=build_edit(t.user_attrs["choice"], ctx))
        rows.append({"trial": t.number, "refusal": t.values[0], "kl": t.values[1],
                     "heretic_rule": sum(heretic_refusal(a, markers) for a in answers),
                     "substring": sum(map(is_refusal, answers)), "n": len(answers),
                     "seconds": time.perf_counter() - start})
        print(f"trial {t.number}: validation refusal {t.values[0]:.4f}, KL {t.values[1]:.4f} -> heretic rule "
              f"{rows[-1]['heretic_rule']}/{len(answers)}, our substring judge {rows[-1]['substring']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"run_dir": args.run_dir, "tokens": args.tokens, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
