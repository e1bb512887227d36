"""The whole default job on a tiny model: plumbing, artifacts and resume (fast)."""

import json

import pytest

from refusal_atlas.settings import load_settings
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.workflows.run import run


@pytest.fixture
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def test_run_writes_all_artifacts_and_resumes(tmp_path, tiny_dir):
    cfg = load_settings(None, dict(model=str(tiny_dir), n_train=6, n_val=4, n_eval=4, filter_train=False,
                                 layers=[0, 1], positions=[-1], max_new_tokens=3, kl_threshold=1e9,
                                 induce_threshold=-1e9, device="cpu"))
    ws, records = run(cfg, tmp_path / "r")
    r = tmp_path / "r"
    for name in ("manifest.json", "metrics.json", "activations.safetensors", "selection.json",
                 "directions/dim.safetensors", "directions/dim_candidates.safetensors"):
        assert (r / name).is_file(), name
    d = DirectionSet.load(r / "directions/dim.safetensors")
    assert d.layer in (0, 1) and d.method == "dim"
    metrics = json.loads((r / "metrics.json").read_text())
    assert len(metrics) == len(records) == 2 + 3
    assert {m["intervention"] for m in metrics} == {"none", "ablate:dim", f"actadd:dim@{d.layer}x1"}
    assert len(list((r / "completions").glob("*.jsonl"))) == 5
    manifest = json.loads((r / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["timings_s"]) >= {"extract", "select", "evaluate"}
    # resume reuses the saved direction instead of re-selecting
    before = (r / "directions/dim.safetensors").stat().st_mtime_ns
    run(cfg, r, resume=True)
    assert (r / "directions/dim.safetensors").stat().st_mtime_ns == before
    assert len(json.loads((r / "metrics.json").read_text())) == 5  # same records replaced, not duplicated


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="positions"):
        load_settings(None, {"positions": [0]})
    with pytest.raises(ConfigError, match="n_train"):
        load_settings(None, {"n_train": 0})
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/no/such/config.toml")


def test_run_settings_keep_run_values_for_unset_overrides(tmp_path):
    from refusal_atlas.settings import run_settings

    for config in ({"n_eval": 7, "max_new_tokens": 5}, {"evaluation": {"n_eval": 7, "max_new_tokens": 5}}):
        cfg = run_settings({"config": config}, {"n_eval": None, "max_new_tokens": 9}).evaluation
        assert cfg.n_eval == 7 and cfg.max_new_tokens == 9
