"""Layered settings: CLI > REFUSAL_ATLAS_* env > ./refusal-atlas.toml > --config > manifest > defaults."""

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from refusal_atlas import __version__
from refusal_atlas.cli import app
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import read_json
from refusal_atlas.settings import resolve_config


def _layers(tmp_path):
    given = tmp_path / "given.toml"
    given.write_text('n_train = 10\nn_val = 11\nn_eval = 12\nseed = 13\n')
    (tmp_path / "refusal-atlas.toml").write_text("n_val = 21\nn_eval = 22\nseed = 23\n")
    return given, {"REFUSAL_ATLAS_N_EVAL": "32", "REFUSAL_ATLAS_SEED": "33", "REFUSAL_ATLAS_LAYERS": "[3, 4]",
                   "REFUSAL_ATLAS_QUIET": "1"}  # QUIET is not a setting: ignored


def test_each_layer_overrides_the_one_below_and_says_so(tmp_path):
    given, env = _layers(tmp_path)
    r = resolve_config({"seed": 43, "n_val": None}, given, layered=True, environ=env, cwd=tmp_path)
    cfg = r.config
    assert (cfg.n_train, cfg.n_val, cfg.n_eval, cfg.seed, cfg.layers, cfg.n_eval) == (10, 21, 32, 43, [3, 4], 32)
    assert r.sources["n_train"] == f"--config {given}" and r.sources["n_val"] == "./refusal-atlas.toml"
    assert r.sources["n_eval"] == "env REFUSAL_ATLAS_N_EVAL" and r.sources["seed"] == "cli"
    assert r.sources["model"] == "default" and cfg.model == "embedded"
    text = r.describe()
    assert re.search(r"^seed +\= 43 +# cli$", text, re.M) and "# env REFUSAL_ATLAS_LAYERS" in text
    pure = resolve_config(None, None, layered=False, environ=env, cwd=tmp_path).config  # library default: no env
    assert pure.seed == 0 and pure.layers is None


def test_an_existing_run_keeps_its_identity_against_env_and_files(tmp_path):
    base = {"model": "/models/a", "seed": 5, "n_val": 7, "kl_threshold": 0.2}
    env = {"REFUSAL_ATLAS_MODEL": "embedded", "REFUSAL_ATLAS_KL_THRESHOLD": "0.05"}
    r = resolve_config({}, None, base=base, layered=True, environ=env, cwd=tmp_path)
    assert r.config.model == "/models/a" and r.sources["model"] == "run manifest"
    assert r.config.kl_threshold == 0.05 and r.config.n_val == 7
    assert any(note.startswith("model from env") for note in r.ignored)
    assert resolve_config({"model": "other"}, base=base, layered=False).config.model == "other"  # a flag can


def test_bad_layers_fail_with_one_line_naming_the_source(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("n_trian = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'n_trian'"):
        resolve_config(None, bad, layered=False)
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(None, tmp_path / "missing.toml", layered=False)
    with pytest.raises(ConfigError, match=r"n_train \(from env REFUSAL_ATLAS_N_TRAIN\)"):
        resolve_config(None, None, layered=True, environ={"REFUSAL_ATLAS_N_TRAIN": "1"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="REFUSAL_ATLAS_"):
        resolve_config(None, None, layered=True, environ={"REFUSAL_ATLAS_LAYERS": "[3,"}, cwd=tmp_path)


def test_config_verb_and_version(tmp_path, monkeypatch):
    given, env = _layers(tmp_path)
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = CliRunner().invoke(app, ["--config", str(given), "config"])
    assert out.exit_code == 0, out.output
    lines = {line.split("=")[0].strip(): line for line in out.output.splitlines() if "=" in line}
    assert "= 10" in lines["n_train"] and f"--config {given}" in lines["n_train"]
    assert "= 21" in lines["n_val"] and "./refusal-atlas.toml" in lines["n_val"]
    assert "= 33" in lines["seed"] and "env REFUSAL_ATLAS_SEED" in lines["seed"]
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
    search = runner.invoke(app, ["search", "--help"]).output
    assert "[k, k_max]" in search
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
    assert stored == resolve_config(None, toml, layered=False).config.model_dump()
    assert stored["seed"] == 7 and stored["ablation_mode"] == "sequential"
    shown = CliRunner().invoke(app, ["config", "-r", str(tmp_path / "r")])
    assert shown.exit_code == 0 and "# run manifest" in shown.output
    assert re.search(r"^kl_threshold +\= 0\.5 +# run manifest$", shown.output, re.M)
