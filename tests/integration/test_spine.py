"""Real behaviour of the spine on the embedded model, on held-out prompts (never the train split)."""

import json
import os
import subprocess
import sys

from refusal_atlas.data import load_prompts
from refusal_atlas.directions.dim import difference_in_means
from refusal_atlas.evaluation.refusal import is_refusal, next_token_logprobs, refusal_score
from refusal_atlas.model.generation import generate
from refusal_atlas.edits import ActAdd, DirectionalAblation


def _rate(responses):
    return sum(map(is_refusal, responses)) / len(responses)


def test_dim_ablation_lowers_refusal_on_held_out_jailbreakbench(embedded, embedded_dim):
    prompts = [p.instruction for p in load_prompts("jailbreakbench", n=24, seed=1)]
    kw = dict(max_new_tokens=24, batch_size=24)
    base = _rate(generate(embedded.adapter, embedded.chat, prompts, **kw))
    ablated = _rate(generate(embedded.adapter, embedded.chat, prompts,
                             intervention=DirectionalAblation.from_directions(embedded_dim), **kw))
    print(f"JBB(24) refusal: baseline {base:.2f}, DIM ablation {ablated:.2f}")
    assert base >= 0.3, "the embedded model should refuse a good share of JailbreakBench"
    assert ablated <= base / 2


def test_ablation_lowers_logit_refusal_score_on_harmful_test(embedded, embedded_dim):
    prompts = [p.instruction for p in load_prompts("harmful_test", n=32, seed=2)]
    base = refusal_score(next_token_logprobs(embedded.adapter, embedded.chat, prompts), embedded.refusal_ids)
    ablation = DirectionalAblation.from_directions(embedded_dim)
    abl = refusal_score(next_token_logprobs(embedded.adapter, embedded.chat, prompts, intervention=ablation),
                        embedded.refusal_ids)
    assert abl.mean() < base.mean() - 1.0


def test_actadd_induces_refusal_on_harmless_prompts(embedded, embedded_acts):
    # layer 16: where adding the raw DIM vector steers this model towards refusal (selection data:
    # steering score rises with depth; layer 16 is what the default run selects)
    direction = difference_in_means(embedded_acts["harmful"], embedded_acts["harmless"]).at(layer=16, position=-1)
    prompts = [p.instruction for p in load_prompts("harmless_test", n=16, seed=3)]
    kw = dict(max_new_tokens=24, batch_size=16)
    base = _rate(generate(embedded.adapter, embedded.chat, prompts, **kw))
    induced = _rate(generate(embedded.adapter, embedded.chat, prompts,
                             intervention=ActAdd.from_directions(direction, coeff=1.0), **kw))
    print(f"harmless(16) refusal: baseline {base:.2f}, ActAdd {induced:.2f}")
    assert base <= 0.25
    assert induced >= base + 0.25


def test_cli_run_end_to_end_writes_a_complete_run_dir(tmp_path):
    env = {**os.environ, "REFUSAL_ATLAS_QUIET": "1"}
    args = [sys.executable, "-m", "refusal_atlas.cli", "run", "-r", str(tmp_path / "run"), "--n-train", "24",
            "--n-val", "8", "--n-eval", "8", "--layers", "12,14", "--max-new-tokens", "12"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    metrics = json.loads((run / "metrics.json").read_text())
    pairs = {(m["dataset"], m["intervention"]) for m in metrics}
    assert ("jailbreakbench", "none") in pairs and ("jailbreakbench", "ablate:dim") in pairs
    for m in metrics:
        assert m["n"] == 8 and 0 <= m["refusal_rate"] <= 1 and m["ci95"][0] <= m["refusal_rate"] <= m["ci95"][1]
    assert all(m["kl"] >= 0 for m in metrics if m["dataset"] == "harmless_test")
    selection = json.loads((run / "selection.json").read_text())
    assert {c["layer"] for c in selection["candidates"]} == {12, 14}
    # the chosen layer is the rule's winner, not merely one of the two given: the lowest ablation
    # refusal score among candidates that pass the filters (every better-scoring one was filtered)
    chosen = selection["chosen"]
    assert manifest["direction"]["layer"] == chosen["layer"]
    scored = sorted((c for c in selection["candidates"] if "refusal" in c), key=lambda c: c["refusal"])
    winner = next(c for c in scored if c["status"].startswith("ok"))
    assert (winner["layer"], winner["position"]) == (chosen["layer"], chosen["position"])
    assert all(c["status"].startswith("filtered") for c in scored if c["refusal"] < winner["refusal"])
    assert winner["refusal"] < selection["baseline"]["harmful_refusal_score"]  # ablating it lowers refusal
    assert "refusal" in proc.stdout and "ablate:dim" in proc.stdout
