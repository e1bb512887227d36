"""RDO on the embedded model: a few steps from DIM keep a unit direction that still removes refusal.

Budget: 6+6 train prompts with 12-token targets, 3 AdamW steps (lr 3e-3) of 4 examples, 8+8 validation
prompts (harmful_val / harmless_val, not seen in training), 12 held-out JailbreakBench prompts.
"""

from __future__ import annotations

import time

import pytest
import torch

from refusal_atlas.data import load_prompts
from refusal_atlas.directions.dim import difference_in_means
from refusal_atlas.directions.optim import TrainConfig, TrainingData, ValidationSet
from refusal_atlas.directions.rdo import train_rdo
from refusal_atlas.directions.targets import build_targets
from refusal_atlas.directions.training_setup import TrainingSetup
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.edits import DirectionalAblation

DIM_LAYER = 16


def _texts(name: str, n: int) -> list[str]:
    return [p.instruction for p in load_prompts(name, n=n, seed=0)]


def test_a_few_rdo_steps_from_dim_keep_a_working_unit_direction(embedded, embedded_acts):
    t0 = time.perf_counter()
    adapter, chat, ids = embedded.adapter, embedded.chat, embedded.refusal_ids
    # layer 16 is where `run` selects DIM on this model (low KL, and ActAdd induces refusal there)
    dim = difference_in_means(embedded_acts["harmful"], embedded_acts["harmless"]).at(layer=DIM_LAYER, position=-1)
    targets = build_targets(adapter, chat, dim, _texts("harmful_train", 6), _texts("harmless_train", 6),
                            max_new_tokens=12, batch_size=6)
    assert all(t.strip() for t in targets.answer)  # the model answers under DIM ablation
    val = ValidationSet(adapter, chat, _texts("harmful_val", 8), _texts("harmless_val", 8), ids, batch_size=8)
    cfg = TrainConfig(steps=3, batch_size=4, micro_batch=2, eval_every=1, lr=3e-3)
    rdo = train_rdo(adapter, TrainingSetup(dim, targets, TrainingData(chat, targets), val, {}), init="dim", cfg=cfg)

    alpha = float(dim.norms[0])
    assert abs(float(rdo.norms[0]) / alpha - 1) < 1e-5  # α·(unit vector)
    assert len(rdo.meta["history"]["loss"]) == 3 and all(torch.isfinite(torch.tensor(rdo.meta["history"]["loss"])))
    trained = rdo.meta["val_history"][-1]
    assert trained["step"] == 3

    base_val = float(refusal_score(next_token_logprobs(adapter, chat, val.harmful, 8), ids).mean())
    history = [(v["step"], round(v["refusal"], 2), round(v["kl"], 3)) for v in rdo.meta["val_history"]]
    print("\nvalidation (step, refusal score, KL):", history)
    assert trained["refusal"] < base_val - 0.5  # the trained iterate (not just DIM) still removes refusal
    assert trained["kl"] < 0.5
    # training moved the direction: the trained iterate differs from DIM and scores lower refusal than DIM
    # (step 0 of val_history is DIM itself), so a RDO that returned DIM unchanged could not pass this
    dim_val = rdo.meta["val_history"][0]
    assert dim_val["step"] == 0 and trained["refusal"] < dim_val["refusal"] - 0.1
    # and RDO returns the iterate its rule selects: the lowest validation objective (refusal + 10·KL), which on
    # a 3-step budget may be DIM itself when KL grows faster than refusal falls
    best = min(rdo.meta["val_history"], key=lambda v: (v["objective"], v["step"]))
    assert rdo.meta["best_step"] == best["step"]
    assert val.score_one(rdo.unit()[0])["objective"] == pytest.approx(best["objective"], abs=1e-4)
    if best["step"] == 0:
        assert torch.allclose(rdo.unit()[0], dim.vectors[0] / dim.vectors[0].norm(), atol=1e-6)
    else:
        assert rdo.meta["cos_with_dim"] < 1 - 1e-4

    held_out = _texts("jailbreakbench", 12)
    base = refusal_score(next_token_logprobs(adapter, chat, held_out, 12), ids).mean()
    ablated = refusal_score(next_token_logprobs(adapter, chat, held_out, 12,
                                                intervention=DirectionalAblation.from_directions(rdo)), ids).mean()
    print(f"RDO 3 steps: val refusal {base_val:.2f} -> {trained['refusal']:.2f} (KL {trained['kl']:.3f}); "
          f"JBB refusal score {float(base):.2f} -> {float(ablated):.2f}; cos(DIM) {rdo.meta['cos_with_dim']:.3f}; "
          f"{time.perf_counter() - t0:.0f}s")
    assert float(ablated) < float(base) - 1.0
