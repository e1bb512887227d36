"""Claim (g): the edit our search picks beats DIM and SOM-k on held-out refusal at the same damage.

The search picks its edit on validation prompts under the selection's KL bound; DIM and the SOM-k subset come
from row (b) at their matched strengths, and the searched edit is swept and matched the same way (its own
per-layer weights scaled: matched_kl.py), so the three are compared at one validation KL.
"""

from __future__ import annotations

from typing import Any

from refusal_atlas.evaluation.verdicts import all_of
from refusal_atlas.workflows.reproduce.matched_kl import (
    RULE,
    compare_matched,
    matching_caveats,
    measure_matched,
    scaled,
)
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, over_bound_caveat, row


# --- (g) ----------------------------------------------------------------------------------------------
def row_g(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    from refusal_atlas.edits import load_run_edit
    from refusal_atlas.settings import SearchSettings
    from refusal_atlas.workflows.search import edit_search_step

    b, ws = ctx.budget, ctx.ws
    search = SearchSettings(seed=b.seed, sets=("som",), n_startup_trials=max(1, min(10, b.edit_trials // 2)))
    summary = edit_search_step(ws, ctx.sets, search, until=b.edit_trials)
    edit = load_run_edit(ws.run.path, "search_best")
    found = measure_matched(ctx, "searched edit", lambda s: scaled(edit, s))
    dim, som = done["b"]["matched"]["dim"], done["b"]["matched"]["som_sequential"]
    numbers: dict[str, Any] = {}
    for name, m in (("search", found), ("dim", dim), ("som", som)):
        numbers[f"{name}_refusal"], numbers[f"{name}_kl"] = m["heldout_refusal"], m["heldout_kl"]
        numbers[f"{name}_strength"] = {"value": m["strength"], "ci95": None}
    parts = [compare_matched(found, dim, "refusal search vs DIM"),
             compare_matched(found, som, "refusal search vs SOM-k")]
    chosen = summary["chosen"]
    return row("our searched edit suppresses refusal more than DIM and than the best SOM-k subset at the same damage",
               f"refusal rate on the same held-out prompts (greedy, {b.max_new_tokens} tokens, substring) and KL, each "
               f"at its matched strength: {RULE}; the edit was chosen on validation after "
               f"{summary['n_trials']['complete']} trials ({chosen['why']}); DIM and SOM-k (sequential) from row (b)",
               f"{ctx.harmful_pool} (refusal), {b.eval_harmless} (KL)", numbers["dim_refusal"]["n"], numbers,
               all_of(parts), [*ctx.caveats, *over_bound_caveat("the searched edit", chosen.get("kl"),
                                                                ws.settings.selection.kl_threshold),
                               *matching_caveats([found, dim, som])],
               edit={"label": edit.label, "fingerprint": edit.fingerprint(), "choice": chosen.get("choice"),
                     "search_val_refusal": chosen.get("refusal"), "search_val_kl": chosen.get("kl")},
               matched={"search": found}, parts=[p.to_dict() for p in parts])
