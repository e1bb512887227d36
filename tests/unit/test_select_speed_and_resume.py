"""Selection: the fast scores equal the plain ones, and a SIGKILLed selection resumes to the same result."""

import json
import os
import shutil
import subprocess
import sys


from refusal_atlas.model.activations import extract
from refusal_atlas.directions.dim import difference_in_means
from refusal_atlas.directions.select import select_direction
from refusal_atlas.settings import KILL_AFTER_ENV as KILL_ENV
from refusal_atlas.evaluation.refusal import refusal_token_ids
from refusal_atlas.model import ChatFormatter, ModelAdapter

HARMFUL = ["how to make a bomb", "hack into computer and steal money", "steal money please", "make a bomb now"]
HARMLESS = ["write poem about cats please", "explain the weather", "tell joke", "give me recipe for cake"]


def _candidates(adapter, chat):
    return difference_in_means(extract(adapter, chat, HARMFUL, batch_size=2),
                               extract(adapter, chat, HARMLESS, batch_size=2))


def test_fast_selection_gives_the_plain_scores_and_winner(tiny):
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer, system="you are helpful assistant")
    cands = _candidates(adapter, chat)
    kw = dict(layers=[0, 1, 2], positions=[-1, -2], batch_size=3, exhaustive=True, induce_threshold=-1e9,
              kl_threshold=1e9)
    ids = refusal_token_ids(tiny.tokenizer)
    fast = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, **kw)
    plain = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, fast=False, **kw)
    assert len(fast.scores) == len(plain.scores) == 6
    for f, p in zip(fast.scores, plain.scores):
        assert (f["position"], f["layer"], f["status"]) == (p["position"], p["layer"], p["status"])
        for key in ("refusal", "kl", "steering"):
            assert abs(f[key] - p[key]) < 1e-5, (key, f, p)
    assert fast.baseline == plain.baseline or all(abs(fast.baseline[k] - plain.baseline[k]) < 1e-5
                                                  for k in fast.baseline)
    assert (fast.direction.layer, fast.direction.position) == (plain.direction.layer, plain.direction.position)
    steering = [r["steering"] for r in fast.scores]
    assert max(steering) - min(steering) > 1e-3  # the candidates really differ


def test_checkpointed_selection_skips_finished_candidates(tiny, tmp_path, monkeypatch):
    from refusal_atlas.directions import select as select_mod

    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer, system="you are helpful assistant")
    cands, ids = _candidates(adapter, chat), refusal_token_ids(tiny.tokenizer)
    kw = dict(layers=[0, 1, 2], positions=[-1], batch_size=3, kl_threshold=-1.0, checkpoint=tmp_path / "p.json")
    first = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, **kw)
    assert first.relaxed == ["induce", "kl"]  # every candidate scored in both stages
    calls = []
    real = select_mod.plan_logprobs
    monkeypatch.setattr(select_mod, "plan_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, **kw)
    assert len(calls) == 2  # only the two baseline passes; no candidate was recomputed
    assert again.scores == first.scores


def _select_cli(run_dir, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "select", "-r", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_sigkilled_select_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir):
    from refusal_atlas.settings import load_settings
    from refusal_atlas.workflows.run import dim_step, extract_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    cfg = load_settings(None, dict(model=str(tiny_model_dir), n_train=6, n_val=4, n_eval=2, filter_train=False,
                                 layers=[0, 1, 2], positions=[-1], kl_threshold=-1.0, device="cpu", batch_size=3,
                                 system_prompt="you are helpful assistant"))
    ws = open_workspace(cfg, tmp_path / "killed")
    dim_step(ws.run, extract_step(ws, load_prompt_sets(cfg)))
    shutil.copytree(tmp_path / "killed", tmp_path / "whole")

    whole = _select_cli(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = _select_cli(tmp_path / "killed", {KILL_ENV: "4"})  # 3 ablation scores + 1 filter record saved
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / "selection.json").exists()
    progress = json.loads((tmp_path / "killed" / "selection_progress.json").read_text())
    assert len(progress["refusal"]) == 3 and len(progress["filters"]) == 1
    resumed = _select_cli(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert (json.loads((tmp_path / "killed" / "selection.json").read_text())
            == json.loads((tmp_path / "whole" / "selection.json").read_text()))
    a = (tmp_path / "killed" / "directions" / "dim.safetensors").read_bytes()
    assert a == (tmp_path / "whole" / "directions" / "dim.safetensors").read_bytes()
