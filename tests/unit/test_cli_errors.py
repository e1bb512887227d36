"""Bad input → one line on stderr starting with 'error:', exit status 2, no traceback, no run dir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refusal_atlas.model.saving import save_model_dir
from tiny import TinyLoaded, tiny_tokenizer

CLI = [sys.executable, "-m", "refusal_atlas.cli"]


def _run(args, cwd):
    env = {**os.environ, "REFUSAL_ATLAS_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def _assert_clean_error(proc, pattern, run_dir: Path | None = None):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and pattern in lines[-1], proc.stderr
    if run_dir is not None:
        assert not run_dir.exists(), "a failed run must not leave a run directory"


def test_unknown_model(tmp_path):
    _assert_clean_error(_run(["run", "-r", "r", "--model", "./no/such/model"], tmp_path), "not found", tmp_path / "r")


def test_layer_out_of_range(tmp_path, tiny_dir):
    proc = _run(["run", "-r", "r", "--model", str(tiny_dir), "--layer", "99"], tmp_path)
    _assert_clean_error(proc, "out of range", tmp_path / "r")


def test_empty_and_malformed_dataset_files(tmp_path, tiny_dir):
    (tmp_path / "empty.json").write_text("[]")
    proc = _run(["run", "-r", "r", "--model", str(tiny_dir), "--eval-harmful", "empty.json"], tmp_path)
    _assert_clean_error(proc, "empty", tmp_path / "r")
    (tmp_path / "bad.json").write_text("[{\"instruction\": ")
    proc = _run(["run", "-r", "r", "--model", str(tiny_dir), "--eval-harmful", "bad.json"], tmp_path)
    _assert_clean_error(proc, "bad.json", tmp_path / "r")
    (tmp_path / "nofield.json").write_text(json.dumps([{"prompt": "x"}]))
    proc = _run(["run", "-r", "r", "--model", str(tiny_dir), "--eval-harmful", "nofield.json"], tmp_path)
    _assert_clean_error(proc, "instruction", tmp_path / "r")


def test_model_without_chat_template(tmp_path):
    t = TinyLoaded("qwen2")
    save_model_dir(t.model, tiny_tokenizer(chat_template=None), tmp_path / "m")
    _assert_clean_error(_run(["run", "-r", "r", "--model", str(tmp_path / "m")], tmp_path), "chat template",
                        tmp_path / "r")


def test_verbs_on_missing_run_dir(tmp_path):
    _assert_clean_error(_run(["directions", "dim", "-r", "nowhere"], tmp_path), "not found")


def test_corrupt_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF but not really")
    _assert_clean_error(_run(["run", "-r", "r", "--model", "m.gguf"], tmp_path), "m.gguf", tmp_path / "r")


def test_search_sub_commands_refuse_the_other_searchs_options_and_bad_input(tmp_path):
    """`search edits` and `search subsets` each take only their own options (what the "is for --space" checks
    enforced before the split), and `search -r RUN` is `search edits -r RUN`."""
    run = tmp_path / "run"
    for args, option in [(["search", "subsets", "-r", "run", "--refusal-stat", "logodds"], "--refusal-stat"),
                         (["search", "subsets", "-r", "run", "--max-kl", "0.1"], "--max-kl"),
                         (["search", "subsets", "-r", "run", "--sets", "som"], "--sets"),
                         (["search", "subsets", "-r", "run", "--dtype", "bfloat16"], "--dtype"),
                         (["search", "edits", "-r", "run", "--directions", "som"], "--directions"),
                         (["search", "-r", "run", "--k", "2"], "--k")]:
        proc = _run(args, tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"No such option: {option}" in proc.stderr, proc.stderr
    for args, pattern in [(["search", "-r", "run", "--budget", "soon"], "not found"),  # the run dir is checked first
                          (["search", "edits", "-r", "run"], "run directory not found"),
                          (["search", "subsets", "-r", "run"], "run directory not found")]:
        _assert_clean_error(_run(args, tmp_path), pattern, run)
