"""`directions rdo|cone|repind` and `report` end to end on a tiny run directory (plumbing, artifacts)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from refusal_atlas.settings import load_settings
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.workflows.run import run

TRAIN = ["--n-train", "4", "--n-val", "2", "--target-tokens", "3", "--steps", "2", "--batch-size", "2",
         "--micro-batch", "1", "--eval-every", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    cfg = load_settings(None, dict(model=str(tiny_model_dir), n_train=6, n_val=4, n_eval=4, filter_train=False,
                                 layers=[0, 1], positions=[-1], max_new_tokens=3, kl_threshold=1e9,
                                 induce_threshold=-1e9, device="cpu"))
    path = tmp_path_factory.mktemp("gradient") / "r"
    run(cfg, path)
    return path


def _invoke(*args: str):
    from refusal_atlas.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.filterwarnings("ignore:every t_refusal target was masked")  # random weights never refuse
def test_gradient_verbs_write_directions_with_provenance_and_a_report(tiny_run):
    r = str(tiny_run)
    dim = DirectionSet.load(tiny_run / "directions" / "dim.safetensors")
    res = _invoke("directions", "rdo", "-r", r, *TRAIN)
    assert res.exit_code == 0, res.output
    rdo = DirectionSet.load(tiny_run / "directions" / "rdo.safetensors")
    assert rdo.layer == dim.layer and rdo.meta["provenance"]["n_train_sampled"] == 4
    assert len(rdo.meta["history"]["loss"]) == 2 and rdo.meta["best_step"] in (0, 1, 2)

    res = _invoke("directions", "cone", "-r", r, "--k", "2", "--n-val-samples", "1", "--n-eval-samples", "3",
                  "--n-eval-prompts", "2", *TRAIN)
    assert res.exit_code == 0, res.output
    assert "3 samples on 2 held-out" in res.output
    cone = DirectionSet.load(tiny_run / "directions" / "cone.safetensors")
    ev = cone.meta["sample_eval"]
    assert len(cone) == 2 and ev["n_samples"] == 3 and len(ev["sample_scores"]) == 3
    assert len(ev["basis_scores"]) == 2 and len(ev["random_scores"]) == 4 and isinstance(ev["baseline_score"], float)
    assert ev["min"] <= ev["median"] <= ev["max"] and ev["dataset"] == "jailbreakbench"
    assert (tiny_run / "directions" / "cone_k2.safetensors").is_file()

    res = _invoke("directions", "repind", "-r", r, "--init", "rdo", *TRAIN)
    assert res.exit_code == 0, res.output
    rep = DirectionSet.load(tiny_run / "directions" / "repind.safetensors")
    assert rep.meta["independence_layers"] and len(rep.meta["runs"]) == 1

    res = _invoke("report", "-r", r)
    assert res.exit_code == 0, res.output
    page = (tiny_run / "report.html").read_text()
    for plot in ("training_rdo", "training_cone", "training_repind", "cone_samples"):
        assert (tiny_run / "plots" / f"{plot}.png").is_file() and f'alt="{plot}"' in page, plot
    assert "Skipped" not in page


def test_gradient_verbs_reject_bad_input_before_training(tiny_run, tmp_path):
    res = _invoke("directions", "rdo", "-r", str(tmp_path), *TRAIN)
    assert isinstance(res.exception, ConfigError) and "not a run directory" in str(res.exception)
    res = _invoke("directions", "cone", "-r", str(tiny_run), "--k", "0", *TRAIN)
    assert isinstance(res.exception, ConfigError) and "cone dimension" in str(res.exception)
    res = _invoke("directions", "cone", "-r", str(tiny_run), "--n-eval-prompts", "0", *TRAIN)
    assert isinstance(res.exception, ConfigError) and "n_eval_prompts" in str(res.exception)
    res = _invoke("directions", "rdo", "-r", str(tiny_run), "--steps", "0")
    assert isinstance(res.exception, ConfigError) and "steps" in str(res.exception)
