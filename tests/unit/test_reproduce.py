"""`reproduce` end to end on a tiny random model: rows (a)–(g) with n, CI and verdict, resume, bad input."""

from __future__ import annotations

import pytest

from refusal_atlas.core.errors import ConfigError, RefusalAtlasError
from refusal_atlas.workflows.reproduce.budget import ReproduceBudget

TINY = dict(name="tiny", harmful_train="harmful_train", harmless_train="harmless_train", n_harmful_train=16,
            n_harmless_train=12, filter_train=False, harmful_val="harmful_val", n_val=4, n_eval=4, n_logit=4,
            n_xstest=3, max_new_tokens=2, batch_size=8, layer=2, som_grid=(3, 3), som_iterations=300, k_max=3,
            subset_trials=2, grad_n_train=4, grad_batch=2, grad_n_val=2, target_tokens=2, rdo_steps=2, cone_k_max=2, cone_steps=2,
            cone_samples=2, n_random=2, repind_steps=2, edit_trials=2)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    from refusal_atlas.core.runtime import configure, restore
    from refusal_atlas.workflows.reproduce.job import run_reproduce

    run_dir = tmp_path_factory.mktemp("repro") / "R"
    log = run_dir.parent / "work.log"
    previous = configure(work_log=str(log))  # what REFUSAL_ATLAS_TEST_WORK_LOG does for the CLI, for this module
    data = run_reproduce(run_dir, ReproduceBudget(**TINY), str(tiny_model_dir), device="cpu")
    yield run_dir, data, log
    restore(previous)


def test_every_row_has_n_ci_and_a_verdict_by_a_stated_rule(finished):
    run_dir, data, _ = finished
    assert sorted(data["rows"]) == list("abcdefg")
    for rid, row in data["rows"].items():
        assert row["n"], rid
        assert row["verdict"]["verdict"] in ("supported", "not supported", "inconclusive"), rid
        assert row["verdict"]["rule"], rid
        assert row["prompts"] and row["measured"], rid
        cis = [c.get("ci95") for c in row["numbers"].values() if isinstance(c, dict)]
        if rid != "a":  # (a) is exact arithmetic; every other row carries 95% intervals
            assert any(ci is not None and ci[0] <= ci[1] for ci in cis), rid
    md = (run_dir / "reproduce.md").read_text()
    for rid in "abcdefg":
        assert f"| ({rid}) " in md
    assert (run_dir / "reproduce.json").is_file()
    for rid in "bdef":
        assert (run_dir / data["plots"][rid]).is_file()


def test_row_a_one_neuron_som_equals_dim(finished):
    a = finished[1]["rows"]["a"]
    assert a["numbers"]["relative_error_inverse_schedule"]["value"] < 1e-5
    assert a["verdict"]["verdict"] == "supported"
    # the paper's schedule is not the running mean: a real contrast, not a tautology
    assert a["numbers"]["relative_error_paper_schedule"]["value"] > 1e-3


def test_row_b_curve_covers_k_and_picks_on_validation(finished):
    b = finished[1]["rows"]["b"]
    for mode in ("sequential", "subspace"):
        assert [c["k"] for c in b["curves"][mode]] == [1, 2, 3]
        assert b["numbers"][f"som_{mode}_best"]["k"] in (1, 2, 3)
    assert b["som"]["n_samples"] == 16


def test_rerun_skips_finished_rows_and_redoes_a_missing_one(finished, tiny_model_dir):
    from refusal_atlas.workflows.reproduce.job import row_path, run_reproduce

    run_dir, data, log = finished
    assert log.read_text().count("row\n") == 7
    log.write_text("")
    again = run_reproduce(run_dir, ReproduceBudget(**TINY), str(tiny_model_dir), device="cpu")
    assert log.read_text() == ""  # nothing recomputed, no model loaded
    assert again["rows"]["c"]["numbers"] == data["rows"]["c"]["numbers"]
    row_path(run_dir, "d").unlink()
    again = run_reproduce(run_dir, ReproduceBudget(**TINY), str(tiny_model_dir), device="cpu")
    assert log.read_text().split() == ["row"]  # only (d), and its cone training was reused
    assert again["rows"]["d"]["numbers"]["random_scores"] == data["rows"]["d"]["numbers"]["random_scores"]


def test_changed_budget_is_refused_before_any_model_loads(finished, tiny_model_dir):
    from refusal_atlas.workflows.reproduce.job import check_reproduce_dir

    run_dir = finished[0]
    with pytest.raises(ConfigError, match="n_eval"):
        check_reproduce_dir(run_dir, ReproduceBudget(**{**TINY, "n_eval": 5}), str(tiny_model_dir))


def test_bad_input_cli(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "REFUSAL_ATLAS_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    for args, text in ((["--budget", "huge", "-r", "x"], "unknown --budget"),
                       (["--model", "./no/such/model", "-r", "y"], "not found")):
        proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "reproduce", *args], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=120)
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error:") and text in lines[0], proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_budget_checks():
    with pytest.raises(RefusalAtlasError, match="k_max"):
        ReproduceBudget(k_max=8)


def test_pick_k_uses_validation_numbers_only():
    from refusal_atlas.workflows.reproduce.som_subsets import pick_k

    curve = [{"k": 1, "val_refusal": -1.0, "val_kl": 0.05, "heldout_score": {"mean": -9.0}},
             {"k": 2, "val_refusal": -3.0, "val_kl": 0.08, "heldout_score": {"mean": 5.0}},
             {"k": 3, "val_refusal": -8.0, "val_kl": 0.30, "heldout_score": {"mean": -20.0}}]
    assert pick_k(curve, 0.1)["k"] == 2  # lowest validation refusal under the KL bound; held-out never looked at
    assert pick_k(curve, 0.01)["k"] == 1  # nothing under the bound: the lowest validation KL
