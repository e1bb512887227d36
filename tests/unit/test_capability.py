"""Capability as a third search objective: the offline task's data and sample, the scorer under edits (zero under
NoEdit, moved by a destroying edit), the lm-eval path, the 3-D pruning and pick rules, a three-objective search
end to end on a tiny model (3-D front, resume, identity refused across objective counts), its report section,
and bad --objective input before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import tiny_bpe_tokenizer, tiny_model

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits import ActAdd, NoEdit
from refusal_atlas.evaluation.capability import (CORE, ChoiceTask, LmEvalTask, load_task,
                                                 parse_objectives, sample_items)
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.search.study import pick
from refusal_atlas.search.trial import PruneRule



def _letter_model():
    """A tiny model with a byte-level BPE tokenizer: every choice text of the task encodes to tokens (the shared
    word-level tiny vocabulary maps most of them to nothing once saved and reloaded)."""
    tok = tiny_bpe_tokenizer()
    return tiny_model(vocab_size=len(tok)), tok


# --- the task and its sample ---------------------------------------------------------------------------------
def test_offline_task_is_large_split_and_well_formed():
    task = load_task("basics")
    val, test = task["validation"], task["test"]
    assert len(val) + len(test) >= 200 and len(val) >= 64 and len(test) >= 64
    assert not {it.id for it in val} & {it.id for it in test}  # held-out part never overlaps
    for it in (*val, *test):
        assert len(it.choices) == 4 and len(set(it.choices)) == 4 and 0 <= it.answer < 4
    assert {it.answer for it in val} == {0, 1, 2, 3}  # the right letter is not always the same
    a, b = sample_items(val, 16, seed=1), sample_items(val, 16, seed=1)
    assert a == b and a != sample_items(val, 16, seed=2) and set(a) <= set(val)
    assert sample_items(val, 10_000, seed=1) == list(val)


def test_parse_objectives():
    assert parse_objectives(["refusal", "kl"]) == CORE
    assert parse_objectives(["kl", "refusal", "basics"]) == ("refusal", "kl", "basics")  # canonical order
    for names, match in [(["refusal", "kl", "kl"], "twice"), (["refusal", "basics"], "must include kl"),
                         (["basics"], "refusal and kl"), (["refusal", "kl", "basics", "smoke"], "at most one task")]:
        with pytest.raises(ConfigError, match=match):
            parse_objectives(names)


# --- the scorer ----------------------------------------------------------------------------------------------
def test_choice_scorer_is_zero_unedited_and_moves_when_the_model_is_destroyed():
    model, tok = _letter_model()
    adapter, chat = ModelAdapter(model), ChatFormatter(tok, system="you are helpful assistant")
    items = sample_items(load_task("basics")["validation"], 12, seed=0)
    task = ChoiceTask(adapter, chat, items, name="basics", batch_size=5)
    base = task.baseline()
    assert base["n"] == 12 and 0 <= base["accuracy"] <= 1 and base["nll"] > 0
    with NoEdit().apply(adapter):
        same = task.score()
    assert same["loss"] == 0.0 and same["accuracy"] == base["accuracy"]
    vector = 50 * torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    with ActAdd(vector, layer=1, coeff=1.0).apply(adapter):
        broken = task.score()
    assert broken["loss"] != 0.0 and abs(broken["loss"]) > 1e-3 and broken["nll"] == pytest.approx(base["nll"] + broken["loss"])
    assert task.score()["loss"] == 0.0  # the edit is gone after its block
    # each (item, choice) sequence is the rendered question followed by the choice's own tokens, and its score is
    # the summed log-likelihood of those tokens: recomputed here one sequence at a time, without padding
    logl = task._choice_logliks()
    i, j, seq, n = task.seqs[5]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
    direct = sum(float(lp[len(seq) - n - 1 + t, seq[len(seq) - n + t]]) for t in range(n))
    assert logl[i, j] == pytest.approx(direct, abs=1e-4)
    assert seq[:len(seq) - n] == tok(chat.render(items[i].question), add_special_tokens=False)["input_ids"]
    assert task.fingerprint() == ChoiceTask(adapter, chat, items, name="basics", batch_size=3).fingerprint()


def test_lm_eval_task_scores_the_bundled_smoke_task_under_an_edit(tiny):
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    task = LmEvalTask(adapter, chat, "smoke", limit=3, batch_size=4)
    base = task.baseline()
    assert base["n"] == 3 and base["nll"] > 0
    with NoEdit().apply(adapter):
        assert task.score()["loss"] == pytest.approx(0.0, abs=1e-6)
    vector = 50 * torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    with ActAdd(vector, layer=1).apply(adapter):
        assert abs(task.score()["loss"]) > 1e-3


# --- pruning and the pick in three dimensions ----------------------------------------------------------------
def test_pruning_needs_the_task_too():
    rule = PruneRule()
    front = [(0, (-2.0, 0.01, 0.30))]
    assert rule.dominating((0.0, 0.5), [(0, (-2.0, 0.01))]) == 0  # two objectives: as before
    assert rule.dominating((0.0, 0.5, 0.40), front) == 0  # worse on all three
    assert rule.dominating((0.0, 0.5, 0.10), front) is None  # keeps more capability: never pruned for it


def test_pick_rule_with_a_task_bound():
    pts = [{"number": 0, "v": (0.1, 0.05, 0.20)}, {"number": 1, "v": (0.3, 0.05, 0.01)},
           {"number": 2, "v": (0.5, 0.01, 0.002)}, {"number": 3, "v": (0.0, 0.90, 0.00)}]
    values = lambda p: p["v"]  # noqa: E731
    best, why = pick(pts, values, kl_threshold=0.1, task_max=0.05)
    assert best["number"] == 1 and "task loss <= 0.05" in why  # #0 refuses less but loses too much capability
    best, why = pick(pts, values, kl_threshold=0.1, task_max=0.001)
    assert best["number"] == 2 and "lowest task loss" in why
    best, _ = pick(pts, lambda p: p["v"][:2], kl_threshold=0.1)  # two objectives: the old rule
    assert best["number"] == 0
    best, why = pick(pts, values, kl_threshold=0.001, task_max=0.05)
    assert best["number"] == 2 and "lowest KL" in why


def test_a_study_keeps_its_number_of_objectives(tmp_path):
    from refusal_atlas.search.study import check_objectives_match, open_study

    db = tmp_path / "study.db"
    check_objectives_match(db, "s", CORE)  # no file yet: nothing to check
    two = open_study(db, "s", {"seed": 0})
    assert len(two.directions) == 2 and two.user_attrs["identity"] == {"seed": 0}  # the default: as before
    three = ("refusal", "kl", "basics")
    for check in (lambda: check_objectives_match(db, "s", three), lambda: open_study(db, "s", {"seed": 0}, objectives=three)):
        with pytest.raises(ConfigError, match="has 2 objectives .refusal,kl., this search has 3"):
            check()
    check_objectives_match(db, "s", CORE)
    check_objectives_match(db, "other", three)  # another study in the file: no conflict
    assert len(open_study(db, "t", {"seed": 0, "objectives": list(three)}, objectives=three).directions) == 3


# --- on a run directory ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def letter_run(tmp_path_factory):
    from refusal_atlas.model.saving import save_model_dir
    from refusal_atlas.settings import load_settings
    from refusal_atlas.workflows.run import dim_step, extract_step, select_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    root = tmp_path_factory.mktemp("capability")
    model, tok = _letter_model()
    save_model_dir(model, tok, root / "model")
    cfg = load_settings(None, dict(model=str(root / "model"), device="cpu", n_train=8, n_val=4, n_eval=4,
                                   max_new_tokens=2, filter_train=False, layer=2))
    ws = open_workspace(cfg, root / "run")
    sets = load_prompt_sets(cfg)
    select_step(ws, dim_step(ws.run, extract_step(ws, sets)), sets)
    return root / "run"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "refusal_atlas.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "REFUSAL_ATLAS_QUIET": "1", "HF_HUB_OFFLINE": "1"})


def _one_error(proc, match):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr


def test_three_objective_search_end_to_end(letter_run):
    import optuna

    from refusal_atlas.report.html import build_report
    from refusal_atlas.search.study import open_study

    run = str(letter_run)
    args = ["search", "-r", run, "--objective", "refusal,kl,basics", "--task-n", "8", "--n-startup-trials", "2",
            "--verify", "1", "--verify-tokens", "2"]
    proc = _cli(*args, "--trials", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task = basics" in proc.stdout and " acc" in proc.stdout
    summary = json.loads((letter_run / "search_edits.json").read_text())
    assert summary["identity"]["objectives"] == ["refusal", "kl", "basics"] and "task" in summary["objectives"]
    assert summary["rule"]["name"] == "min_verified_refusal_under_kl_and_task"
    assert summary["proxy_rule"]["name"] == "min_refusal_under_kl_and_task"
    assert summary["baseline"]["task"] == 0.0 and summary["baseline"]["task_n"] == 8
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3 and all("task" in t and 0 <= t["capability"]["accuracy"] <= 1 for t in done)
    assert all(t["capability"]["n"] == 8 and t["task"] == pytest.approx(t["capability"]["loss"]) for t in done)
    front = summary["pareto"]
    vals = {t["number"]: (t["refusal"], t["kl"], t["task"]) for t in done}
    for t in front:  # 3-D front: nothing dominates a front point on all three
        assert not any(all(a <= b for a, b in zip(v, vals[t["number"]])) and v != vals[t["number"]]
                       for v in vals.values())
    assert {t["number"] for t in front} == {n for n, v in vals.items() if not any(
        all(a <= b for a, b in zip(u, v)) and u != v for u in vals.values())}
    study = open_study(letter_run / "study.db", summary["study"], objectives=None)
    assert len(study.directions) == 3 and all(d == optuna.study.StudyDirection.MINIMIZE for d in study.directions)

    proc = _cli(*args, "--trials", "4")  # resumes the same study
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((letter_run / "search_edits.json").read_text())
    assert summary["n_trials"]["complete"] == 4 and summary["trials"][0]["task"] == vals[0][2]

    _one_error(_cli("search", "-r", run, "--trials", "5", "--n-startup-trials", "2"), "has 3 objectives")
    proc = _cli("search", "-r", run, "--objective", "refusal,kl,basics", "--task-n", "6", "--trials", "5",
                "--n-startup-trials", "2")  # other items: another objective
    assert proc.returncode == 2 and "objective" in proc.stderr

    page = build_report(letter_run).read_text()
    assert "Edit search" in page and "capability" in page and (letter_run / "plots" / "search_capability.png").is_file()


@pytest.mark.parametrize("objective, match", [("refusal,kl,nosuchtask", "unknown objective 'nosuchtask'"),
                                              ("refusal,kl,kl", "twice"), ("refusal,basics", "must include kl")])
def test_bad_objective_is_one_error_line(letter_run, objective, match):
    _one_error(_cli("search", "-r", str(letter_run), "--objective", objective, "--trials", "1"), match)
