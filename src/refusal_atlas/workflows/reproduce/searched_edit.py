"""Claim (g): the edit our search picks beats DIM and SOM-k on held-out refusal.
"""

from __future__ import annotations

from typing import Any

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.evaluation.verdicts import all_of, lower_is_better
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, ablate, row


# --- (g) ----------------------------------------------------------------------------------------------
def row_g(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    from refusal_atlas.edits import load_run_edit
    from refusal_atlas.settings import SearchSettings
    from refusal_atlas.workflows.search import edit_search_step

    b, ws = ctx.budget, ctx.ws
    search = SearchSettings(seed=b.seed, sets=("som",), n_startup_trials=max(1, min(10, b.edit_trials // 2)))
    summary = edit_search_step(ws, ctx.sets, search, until=b.edit_trials)
    edit = load_run_edit(ws.run.path, "search_best")
    best_b = done["b"]["numbers"]["som_sequential_best"]
    som = DirectionSet.load(ws.run.direction_path("som"))
    som_spec = ablate(som.select(best_b["ids"]), "sequential", label=f"ablate:som{best_b['ids']}:sequential")
    numbers: dict[str, Any] = {}
    for name, spec in (("search", edit), ("dim", ablate(ctx.dim)), ("som", som_spec)):
        numbers[f"{name}_refusal"], numbers[f"{name}_kl"] = ctx.refusal_rate(spec), ctx.kl(spec)
    parts = [lower_is_better(numbers["search_refusal"], numbers["dim_refusal"], "refusal search vs DIM"),
             lower_is_better(numbers["search_refusal"], numbers["som_refusal"], "refusal search vs SOM-k")]
    return row("our searched edit suppresses refusal more than DIM and than the best SOM-k subset",
               f"refusal rate on the same held-out prompts (greedy, substring) and KL; edit chosen on validation "
               f"after {summary['n_trials']['complete']} trials ({summary['chosen']['why']})",
               f"{b.eval_harmful} (refusal), {b.eval_harmless} (KL)", numbers["dim_refusal"]["n"], numbers,
               all_of(parts), edit={"label": edit.label, "fingerprint": edit.fingerprint(),
                                    "choice": summary["chosen"].get("choice")},
               parts=[p.to_dict() for p in parts])

