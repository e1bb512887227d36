"""Claim (c): an RDO direction removes refusal with less damage than DIM.
"""

from __future__ import annotations

from typing import Any

from refusal_atlas.edits import NoEdit
from refusal_atlas.evaluation.verdicts import lower_is_better
from refusal_atlas.workflows.gradient import rdo_step
from refusal_atlas.workflows.reproduce import shared
from refusal_atlas.workflows.reproduce.shared import ReproduceContext, ablate, load_or_train, row, training


def row_c(ctx: ReproduceContext, done: dict) -> dict[str, Any]:
    b = ctx.budget
    rdo = load_or_train(ctx, "rdo", lambda: rdo_step(ctx.ws, training(ctx, b.rdo_steps)))
    specs = {"none": NoEdit(), "dim": ablate(ctx.dim), "rdo": ablate(rdo)}
    numbers: dict[str, Any] = {}
    for name, spec in specs.items():
        numbers[f"{name}_refusal"] = ctx.refusal_rate(spec)
        numbers[f"{name}_xstest_over_refusal"] = ctx.refusal_rate(spec, "xstest", b.n_xstest)
        if name != "none":
            numbers[f"{name}_kl"] = ctx.kl(spec)
    numbers["cos_rdo_dim"] = {"value": float(rdo.unit()[0] @ ctx.dim.unit()[0]), "ci95": None}
    verdict = lower_is_better(numbers["rdo_kl"], numbers["dim_kl"], "held-out KL RDO vs DIM")
    side = {"refusal": lower_is_better(numbers["rdo_refusal"], numbers["dim_refusal"], "refusal RDO vs DIM").to_dict(),
            "over_refusal": lower_is_better(numbers["rdo_xstest_over_refusal"], numbers["dim_xstest_over_refusal"],
                                            "XSTest over-refusal RDO vs DIM").to_dict()}
    return row("RDO's ablation damages harmless behaviour less than DIM's (lower KL), refusal and over-refusal beside",
               f"next-token KL on held-out harmless prompts (bootstrap CI), both at full strength; refusal rate "
               f"({b.max_new_tokens} tokens); XSTest over-refusal "
               f"(RDO trained {rdo.meta.get('train', {}).get('steps')} steps, best step {rdo.meta.get('best_step')})",
               f"{b.eval_harmless} (KL), {ctx.harmful_pool} (refusal), xstest (over-refusal)",
               {"kl": numbers["dim_kl"]["n"], "refusal": numbers["dim_refusal"]["n"],
                "xstest": numbers["dim_xstest_over_refusal"]["n"]}, numbers, verdict, ctx.caveats, parts=side,
               training={"rdo": shared.training_curve(rdo, init=ctx.dim.unit()[0])})
