"""Count a search's refusals the way heretic's evaluator does, without heretic: which trials could cover a point?

Scoring one export with ``heretic --evaluate-model`` takes minutes (bench/vs_heretic.py), so this asks
first, locally: for the completed trials of a run's edit search with validation KL <= ``--max-kl``
(the ``--top`` with the lowest trial refusal number), generate ``--tokens`` greedy tokens on the
``--n`` JailbreakBench prompts under the edit (float32, as the exports run) and count refusals with
heretic-llm's own marker rule (its default ``refusal_markers``, read from the heretic install that
vs_heretic.py made, matched by the ``markers`` judge's rule, refusal_atlas.evaluation.judges.markers: lower case,
``*`` removed, curly apostrophes folded, whitespace collapsed, an empty answer counts) next to our substring
judge's count.

With ``--choices FILE`` it counts edits you name instead of the search's trials: one JSON object per line,
``{"name": ..., "choice": {...}}`` (a choice as the search stores it, e.g. a trial's ``choice`` user attribute
or ``vs_heretic.heretic_choice``), each also scored by the search's trial (validation refusal number, KL)
in the run's dtype. This asks whether any edit near a point gets under it, before minutes of heretic.

On 2026-12-06 (EPYC) the heretic-rule counts of two exported trials equalled heretic's evaluator exactly
(16 and 18 of 100), and the eight trials nearest heretic's strongest point all counted 16 to 20.

    .venv/bin/python bench/heretic_counts.py --run-dir bench_out/vs_heretic/ours/run \\
        --heretic-config bench_out/vs_heretic/venv/lib/python3.11/site-packages/heretic/config.py \\
        (--max-kl 0.0612 [--top 8] | --choices edits.jsonl) [--tokens 32] [--n 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

from refusal_atlas.evaluation.judges.markers import HERETIC_REFUSAL_MARKERS, markers_refusal


def heretic_markers(config_py: Path) -> list[str]:
    """The default ``refusal_markers`` list in heretic's config.py (parsed, not imported: it lives in another venv)."""
    for node in ast.walk(ast.parse(config_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "refusal_markers":
            for kw in getattr(node.value, "keywords", []):
                if kw.arg == "default":
                    return [str(m) for m in ast.literal_eval(kw.value)]
    raise ValueError(f"no refusal_markers default in {config_py}")


CHOICE_KEYS = {"source", "projected", "norm_preserving", "attn", "mlp"}  # what build_edit reads of every choice
KERNEL_KEYS = ("peak", "position", "floor", "distance")


def read_choices(path: Path) -> list[tuple[str, dict]]:
    """``--choices`` file → (name, choice) pairs; a clear error for a line that is not one."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((str(row["name"]), dict(row["choice"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"error: {path}:{number}: want {{\"name\": ..., \"choice\": {{...}}}} ({exc})") from None
        missing = sorted(CHOICE_KEYS - out[-1][1].keys()) + [
            f"{c}.{k}" for c in ("attn", "mlp") for k in KERNEL_KEYS if k not in (out[-1][1].get(c) or {})]
        if missing:
            raise SystemExit(f"error: {path}:{number}: the choice lacks {', '.join(missing)}")
    if not out:
        raise SystemExit(f"error: no edits in {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--heretic-config", required=True, help="heretic's config.py (in the venv vs_heretic.py made)")
    pick = ap.add_mutually_exclusive_group(required=True)
    pick.add_argument("--max-kl", type=float, help="the search's trials with validation KL <= this")
    pick.add_argument("--choices", help="JSON lines of named edit choices to count instead")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    markers = heretic_markers(Path(args.heretic_config))  # bad input fails before the model loads
    if tuple(m.lower() for m in markers) != HERETIC_REFUSAL_MARKERS:
        print(f"note: this heretic's markers differ from the markers judge's copy ({len(markers)} vs "
              f"{len(HERETIC_REFUSAL_MARKERS)}); counting with this heretic's", flush=True)
    named = read_choices(Path(args.choices)) if args.choices else None

    import optuna

    from refusal_atlas.data import load_prompts
    from refusal_atlas.search.sources import EditContext
    from refusal_atlas.evaluation.refusal import is_refusal
    from refusal_atlas.model.generation import generate
    from refusal_atlas.search.edit_space import build_edit
    from refusal_atlas.search.trial import StagedObjective
    from refusal_atlas.workflows.workspace import load_prompt_sets, reopen_workspace

    ws = reopen_workspace(args.run_dir)
    harmful = [p.instruction for p in load_prompts("jailbreakbench", n=args.n, seed=0)]
    ctx = EditContext.from_run(ws.run.path)
    if named is None:
        study = optuna.load_study(study_name="search-edits", storage=f"sqlite:///{Path(args.run_dir) / 'study.db'}")
        trials = sorted((t for t in study.trials if t.values and t.values[1] <= args.max_kl), key=lambda t: t.values[0])
        edits = [(f"trial {t.number}", {"trial": t.number}, t.user_attrs["choice"], tuple(t.values))
                 for t in trials[: args.top]]
    else:
        sets = load_prompt_sets(ws.settings)
        objective = StagedObjective(ws.adapter, ws.chat, [p.instruction for p in sets.harmful_val],
                                    [p.instruction for p in sets.harmless_val], ws.refusal_ids,
                                    batch_size=ws.settings.model.batch_size)
        edits = [(name, {"name": name, "choice": choice}, choice, None) for name, choice in named]
    rows = []
    for label, ident, choice, values in edits:
        edit = build_edit(choice, ctx)
        if values is None:
            values = objective(edit)
        start = time.perf_counter()
        answers = generate(ws.adapter, ws.chat, harmful, args.tokens, ws.settings.evaluation.generation_batch_size, intervention=edit)
        rows.append({**ident, "refusal": values[0], "kl": values[1],
                     "heretic_rule": sum(markers_refusal(a, markers) for a in answers),
                     "substring": sum(map(is_refusal, answers)), "n": len(answers),
                     "seconds": time.perf_counter() - start})
        print(f"{label}: validation refusal {values[0]:.4f}, KL {values[1]:.4f} -> heretic rule "
              f"{rows[-1]['heretic_rule']}/{len(answers)}, our substring judge {rows[-1]['substring']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"run_dir": args.run_dir, "tokens": args.tokens, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
