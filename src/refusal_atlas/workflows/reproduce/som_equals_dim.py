"""Claim (a): a 1-neuron SOM trained with the 1/t schedule equals the difference in means.
"""

from __future__ import annotations

from typing import Any

import torch

from refusal_atlas.directions.som import SomDirections
from refusal_atlas.evaluation.verdicts import within_tolerance
from refusal_atlas.model.activations import load_activation_sets
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, row

SOM_EQUALS_DIM_TOLERANCE = 1e-4  # float32 storage of the vectors; the algebra is exact


# --- (a) ----------------------------------------------------------------------------------------------
def row_a(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    """A 1-neuron SOM with η_t = 1/(t+1) is the running mean: its direction equals DIM."""
    acts = load_activation_sets(ctx.ws.run / "activations.safetensors")
    layer = ctx.dim.layer
    harmful, harmless = acts["harmful"], acts["harmless"]
    dim = (harmful.mean_at(layer, -1) - harmless.mean_at(layer, -1)).to(torch.float64)

    def rel_error(builder: SomDirections) -> float:
        v = builder.fit(harmful, harmless, layer).vectors[0].to(torch.float64)
        return float((v - dim).norm() / dim.norm())

    n = harmful.last.shape[0]  # type: ignore[union-attr]
    inverse = rel_error(SomDirections(grid=(1, 1), lr=1.0, lr_schedule="inverse", iterations=n, seed=ctx.budget.seed))
    paper = rel_error(SomDirections(grid=(1, 1), seed=ctx.budget.seed))  # asymptotic decay, lr 0.01: a contrast
    verdict = within_tolerance(inverse, SOM_EQUALS_DIM_TOLERANCE)
    return row("a 1-neuron SOM with the 1/t schedule equals DIM",
               f"relative error ‖SOM − DIM‖/‖DIM‖ at layer {layer} (train representations; exact, no sampling)",
               f"{ctx.budget.harmful_train} (train, filtered)", n,
               {"relative_error_inverse_schedule": {"value": inverse, "ci95": None},
                "relative_error_paper_schedule": {"value": paper, "ci95": None,
                                                  "note": "MiniSom asymptotic decay, lr 0.01, 10k updates"}},
               verdict, ci_note="deterministic computation: no sampling error, so no interval")
