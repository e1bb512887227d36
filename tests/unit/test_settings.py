"""Layered settings: CLI > REFUSAL_ATLAS_* env > ./refusal-atlas.toml > --config > manifest > defaults."""

import json
import re

import click
import pytest
import typer
from typer.testing import CliRunner

from refusal_atlas import __version__
from refusal_atlas.cli import app
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import read_json
from refusal_atlas.settings import flat_config, resolve_settings, run_settings


def _layers(tmp_path):
    given = tmp_path / "given.toml"
    given.write_text('n_train = 10\nn_val = 11\nn_eval = 12\nseed = 13\n')
    (tmp_path / "refusal-atlas.toml").write_text("n_val = 21\nn_eval = 22\nseed = 23\n")
    return given, {"REFUSAL_ATLAS_N_EVAL": "32", "REFUSAL_ATLAS_SEED": "33", "REFUSAL_ATLAS_LAYERS": "[3, 4]",
                   "REFUSAL_ATLAS_QUIET": "1",  # a runtime setting, not a run's
                   "REFUSAL_ATLAS_TEST_KILL_AFTER": "trial:99"}  # names no setting: ignored


def _config_lines(text: str) -> dict[str, str]:
    """`refusal-atlas config` output → {"section.name": line}."""
    out, section = {}, ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            out[f"{section}.{line.split('=')[0].strip()}"] = line
    return out


def test_each_layer_overrides_the_one_below_and_says_so(tmp_path):
    given, env = _layers(tmp_path)
    r = resolve_settings({"seed": 43, "n_val": None}, given, layered=True, environ=env, cwd=tmp_path)
    cfg = r.settings
    assert (cfg.data.n_train, cfg.data.n_val, cfg.evaluation.n_eval, cfg.data.seed, cfg.selection.layers,
            cfg.evaluation.n_eval) == (10, 21, 32, 43, [3, 4], 32)
    assert r.sources["n_train"] == f"--config {given}" and r.sources["n_val"] == "./refusal-atlas.toml"
    assert r.sources["n_eval"] == "env REFUSAL_ATLAS_N_EVAL" and r.sources["seed"] == "cli"
    assert r.sources["model"] == "default" and cfg.model.model == "embedded"
    assert cfg.runtime.quiet and r.sources["quiet"] == "env REFUSAL_ATLAS_QUIET"
    text = r.describe()
    assert re.search(r"^seed +\= 43 +# cli$", text, re.M) and "# env REFUSAL_ATLAS_LAYERS" in text
    pure = resolve_settings(None, None, layered=False, environ=env, cwd=tmp_path).settings  # library default: no env
    assert pure.data.seed == 0 and pure.selection.layers is None


def test_an_existing_run_keeps_its_identity_against_env_and_files(tmp_path):
    base = {"model": "/models/a", "seed": 5, "n_val": 7, "kl_threshold": 0.2}
    env = {"REFUSAL_ATLAS_MODEL": "embedded", "REFUSAL_ATLAS_KL_THRESHOLD": "0.05"}
    r = resolve_settings({}, None, base=base, layered=True, environ=env, cwd=tmp_path)
    assert r.settings.model.model == "/models/a" and r.sources["model"] == "run manifest"
    assert r.settings.selection.kl_threshold == 0.05 and r.settings.data.n_val == 7
    assert any(note.startswith("model from env") for note in r.ignored)
    assert resolve_settings({"model": "other"}, base=base, layered=False).settings.model.model == "other"  # a flag can


def test_bad_layers_fail_with_one_line_naming_the_source(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("n_trian = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'n_trian'"):
        resolve_settings(None, bad, layered=False)
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_settings(None, tmp_path / "missing.toml", layered=False)
    with pytest.raises(ConfigError, match=r"n_train \(from env REFUSAL_ATLAS_N_TRAIN\)"):
        resolve_settings(None, None, layered=True, environ={"REFUSAL_ATLAS_N_TRAIN": "1"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="REFUSAL_ATLAS_"):
        resolve_settings(None, None, layered=True, environ={"REFUSAL_ATLAS_LAYERS": "[3,"}, cwd=tmp_path)


def test_config_verb_and_version(tmp_path, monkeypatch):
    given, env = _layers(tmp_path)
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = CliRunner().invoke(app, ["--config", str(given), "config"])
    assert out.exit_code == 0, out.output
    lines = _config_lines(out.output)
    assert "= 10" in lines["data.n_train"] and f"--config {given}" in lines["data.n_train"]
    assert "= 21" in lines["data.n_val"] and "./refusal-atlas.toml" in lines["data.n_val"]
    assert "= 33" in lines["data.seed"] and "env REFUSAL_ATLAS_SEED" in lines["data.seed"]
    assert "= 64" in lines["training.n_train"] and "# default" in lines["training.n_train"]
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"refusal-atlas {__version__}"


def _commands(group: click.Group, prefix=""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def test_every_option_has_help_and_help_text_is_literal():
    root = typer.main.get_command(app)
    for name, cmd in _commands(root):
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{name} {param.opts[0]} has no help"
                if param.default is not None and not param.required and param.show_default is False:
                    pytest.fail(f"{name} {param.opts[0]} hides its default")
    runner = CliRunner()
    evaluate = runner.invoke(app, ["evaluate", "--help"]).output
    assert "{datasets}" not in evaluate and "{" not in evaluate.split("Options")[0]
    search = runner.invoke(app, ["search", "subsets", "--help"]).output
    assert "[k, k_max]" in search
    group = runner.invoke(app, ["search", "--help"]).output
    assert "edits" in group and "subsets" in group
    run_help = " ".join(runner.invoke(app, ["run", "--help"]).output.split())
    assert "train prompts per side [setting n_train; default: 128]" in run_help


def test_toml_round_trips_through_a_run_manifest(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./refusal-atlas.toml here
    toml = tmp_path / "exp.toml"
    toml.write_text(f'model = "{tiny_model_dir}"\nn_train = 4\nn_val = 3\nn_eval = 2\nfilter_train = false\n'
                    'layers = [1, 2]\npositions = [-1]\nmax_new_tokens = 2\ndevice = "cpu"\nseed = 7\n'
                    'kl_threshold = 0.5\nablation_mode = "sequential"\n')
    out = CliRunner().invoke(app, ["run", "--config", str(toml), "-r", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    stored = read_json(tmp_path / "r" / "manifest.json")["config"]
    assert stored == resolve_settings(None, toml, layered=False).settings.run_config()
    assert stored["data"]["seed"] == 7 and stored["selection"]["ablation_mode"] == "sequential"
    shown = CliRunner().invoke(app, ["config", "-r", str(tmp_path / "r")])
    assert shown.exit_code == 0 and "# run manifest" in shown.output
    assert re.search(r"^kl_threshold +\= 0\.5 +# run manifest$", shown.output, re.M)


# --- sections ----------------------------------------------------------------------------------------------
def test_nested_sections_from_every_layer_with_precedence_and_sources(tmp_path):
    given = tmp_path / "given.toml"
    given.write_text('[data]\nn_train = 10\n[search]\nscore_tokens = 4\nk = 4\n[training]\nsteps = 7\n')
    (tmp_path / "refusal-atlas.toml").write_text("[search]\nk = 6\nmax_kl = 0.2\n[runtime]\nheartbeat_s = 9\n")
    env = {"REFUSAL_ATLAS_DATA__N_VAL": "21", "REFUSAL_ATLAS_SEARCH__SCORE_TOKENS": "8",
           "REFUSAL_ATLAS_TRAINING__STEPS": "9", "REFUSAL_ATLAS_SEARCH__SETS": '["som"]'}
    r = resolve_settings({"search": {"k": 5, "prune": None}, "training": {"steps": 11}}, given, layered=True,
                         environ=env, cwd=tmp_path)
    s = r.settings
    assert (s.data.n_train, s.data.n_val) == (10, 21)
    assert (s.search.score_tokens, s.search.k, s.search.max_kl, s.search.sets, s.search.prune) == (8, 5, 0.2, ("som",), True)
    assert s.training.steps == 11 and s.runtime.heartbeat_s == 9
    assert r.sources["n_train"] == f"--config {given}" and r.sources["n_val"] == "env REFUSAL_ATLAS_DATA__N_VAL"
    assert r.sources["search.score_tokens"] == "env REFUSAL_ATLAS_SEARCH__SCORE_TOKENS"
    assert r.sources["search.k"] == "cli" and r.sources["search.max_kl"] == "./refusal-atlas.toml"
    assert r.sources["search.prune"] == "default" and r.sources["training.steps"] == "cli"
    assert r.sources["heartbeat_s"] == "./refusal-atlas.toml"
    lines = _config_lines(r.describe())
    assert re.search(r"= 8 +# env REFUSAL_ATLAS_SEARCH__SCORE_TOKENS$", lines["search.score_tokens"])
    assert re.search(r"= 5 +# cli$", lines["search.k"]) and "# default" in lines["search.n_startup_trials"]
    # the flat and the nested name of one setting are the same setting, in a file as in the environment
    (tmp_path / "flat.toml").write_text("n_val = 5\n")
    (tmp_path / "nested.toml").write_text("[data]\nn_val = 5\n")
    from_flat = resolve_settings(None, tmp_path / "flat.toml", layered=False).settings
    assert from_flat == resolve_settings(None, tmp_path / "nested.toml", layered=False).settings
    from_env = resolve_settings(None, layered=True, environ={"REFUSAL_ATLAS_N_VAL": "5"}, cwd=tmp_path / "none")
    assert from_flat.data.n_val == from_env.settings.data.n_val == 5


def test_section_names_errors_name_the_setting_and_its_layer(tmp_path):
    (tmp_path / "twice.toml").write_text("n_train = 4\n[data]\nn_train = 5\n")
    with pytest.raises(ConfigError, match="n_train is given twice"):
        resolve_settings(None, tmp_path / "twice.toml", layered=False)
    with pytest.raises(ConfigError, match="n_train is given twice"):
        resolve_settings({"data": {"n_train": 4}, "n_train": 5}, layered=False)
    (tmp_path / "flat_search.toml").write_text("score_tokens = 4\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'score_tokens'.*\[search\] score_tokens"):
        resolve_settings(None, tmp_path / "flat_search.toml", layered=False)
    (tmp_path / "typo.toml").write_text("[search]\nscore_tokenz = 4\n")
    with pytest.raises(ConfigError, match="unknown setting 'search.score_tokenz'"):
        resolve_settings(None, tmp_path / "typo.toml", layered=False)
    with pytest.raises(ConfigError, match="unknown setting 'data.layers'.*REFUSAL_ATLAS_DATA__LAYERS"):
        resolve_settings(None, layered=True, environ={"REFUSAL_ATLAS_DATA__LAYERS": "[3]"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"invalid setting vllm_tp \(from env REFUSAL_ATLAS_VLLM_TP\)"):
        resolve_settings(None, layered=True, environ={"REFUSAL_ATLAS_VLLM_TP": "0"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"invalid setting search.k \(from cli\)"):
        resolve_settings({"search": {"k": "many"}}, layered=False)


OLD_FLAT_CONFIG = {  # a manifest's config as the code before the sections wrote it (RunConfig.model_dump())
    "model": "/models/a", "device": None, "dtype": None, "device_map": None, "max_memory": None,
    "dtype_fallback": True, "backend": "hf", "system_prompt": None, "chat_template": None, "seed": 5,
    "batch_size": 32, "generation_batch_size": 128, "harmful_train": "harmful_train",
    "harmless_train": "harmless_train", "n_train": 64, "filter_train": True, "harmful_val": "harmful_val",
    "harmless_val": "harmless_val", "n_val": 7, "layers": [3, 4], "positions": [-1], "kl_threshold": 0.2,
    "induce_threshold": 0.0, "prune_layer_frac": 0.2, "strict_filters": False, "layer": None,
    "ablation_mode": "sequential", "eval_harmful": ["jailbreakbench"], "eval_harmless": "harmless_test",
    "n_eval": 9, "max_new_tokens": 16, "stop_when_decided": True}


def test_an_old_flat_manifest_still_loads(tmp_path):
    s = run_settings({"config": OLD_FLAT_CONFIG})
    assert (s.model.model, s.data.seed, s.data.n_train, s.selection.layers, s.selection.ablation_mode,
            s.evaluation.n_eval) == ("/models/a", 5, 64, [3, 4], "sequential", 9)
    # every recorded value, none lost or renamed; settings added since (the judge of reported rates) at their defaults
    added = {"judge": "substring"}
    assert s.flat() == {**OLD_FLAT_CONFIG, **added}
    assert flat_config(OLD_FLAT_CONFIG) == OLD_FLAT_CONFIG
    assert flat_config(s.run_config()) == {**OLD_FLAT_CONFIG, **added}
    # a stage check reads the old manifest as well: changing n_train with its activations on disk is refused
    from refusal_atlas.workflows.validate import check_run_settings

    (tmp_path / "activations.safetensors").write_bytes(b"x")
    manifest = {"config": OLD_FLAT_CONFIG}
    new = run_settings(manifest, {"n_train": 32}).flat()
    with pytest.raises(ConfigError, match=r"n_train: 64 \(run\) vs 32 \(now\)"):
        check_run_settings(tmp_path, manifest, new)
    assert check_run_settings(tmp_path, manifest, run_settings(manifest, {"n_eval": 3}).flat()) == {}
    # and `refusal-atlas config -r` shows its values as the manifest's
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shown = CliRunner().invoke(app, ["config", "-r", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"^n_train +\= 64 +# run manifest$", shown.output, re.M)


def test_runtime_settings_reach_the_library_and_are_restored(tmp_path):
    from refusal_atlas.core.runtime import restore, runtime
    from refusal_atlas.settings import apply_runtime

    before = runtime()
    env = {"REFUSAL_ATLAS_CACHE": str(tmp_path / "cache"), "REFUSAL_ATLAS_QUIET": "1",
           "REFUSAL_ATLAS_HEARTBEAT_S": "2", "REFUSAL_ATLAS_TEST_KILL_AFTER": "trial:3",
           "REFUSAL_ATLAS_TEST_WORK_LOG": str(tmp_path / "log")}
    previous = apply_runtime(env, cwd=tmp_path)
    try:
        now = runtime()
        assert now.cache_root == tmp_path / "cache" and now.quiet and now.heartbeat_s == 2 and now.grace_s == 30
        assert now.kill_after == "trial:3" and now.work_log == str(tmp_path / "log")
        from refusal_atlas.model.embedded import cache_root

        assert cache_root() == tmp_path / "cache"
    finally:
        restore(previous)
    assert runtime() == before
