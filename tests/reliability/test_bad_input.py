"""Bad input: one `error:` line, exit 2, in seconds, no model load, nothing created or changed.

Each case is one command through ``main()`` (see conftest.py for what every case asserts).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from refusal_atlas.directions.base import DirectionSet

# --- run directories ---------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", [["evaluate"], ["select"], ["export", "--out", "o"], ["report"], ["search"],
                                  ["directions", "rdo"], ["directions", "dim"]])
def test_verbs_on_a_missing_run_dir(cli, tmp_path, verb):
    cli([*verb, "-r", tmp_path / "no" / "such" / "dir"], "run directory not found")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("verb", [["evaluate"], ["select"], ["export", "--out", "o"], ["search"]])
def test_verbs_on_an_empty_dir(cli, tmp_path, verb):
    (tmp_path / "empty").mkdir()
    cli([*verb, "-r", "empty"], ["empty, not a run directory", "no manifest.json"])


def test_run_dir_that_is_a_regular_file(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("my notes")
    cli(["select", "-r", "notes.txt"], "is a file, not a run directory")
    cli(["run", "-r", "notes.txt", "--model", "./none"], "is a file, not a run directory")
    cli(["extract", "-r", "notes.txt"], "is a file, not a run directory")


def test_run_into_a_foreign_non_empty_dir(cli, tmp_path, tiny_model_dir):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("two years of work")
    cli(["run", "-r", "docs", "--model", tiny_model_dir], "is not empty and is not a run directory")


def test_foreign_and_corrupt_manifests(cli, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps({"name": "some other tool"}))
    cli(["evaluate", "-r", "foreign"], "was not written by refusal-atlas")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text('{"config": ')
    cli(["export", "-r", "corrupt", "--out", "o"], "corrupt JSON")


def test_read_only_run_dir(cli, run_dir, monkeypatch):
    # tests run as root in CI, where chmod does not stop writes: the permission is what the check reads
    real = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode, **kw: False if str(p) == str(run_dir) and mode & os.W_OK else real(p, mode, **kw))
    cli(["evaluate", "-r", run_dir], "is not writable")


def test_resume_with_other_settings_names_them(cli, run_dir, tiny_model_dir):
    cli(["run", "-r", run_dir, "--resume", "--seed", "1", "--n-train", "64"],
        ["other settings", "seed: 0 (run) vs 1 (now)", "n_train: 128 (run) vs 64 (now)"])
    cli(["run", "-r", run_dir, "--model", "embedded"], ["model: ", "'embedded' (now)"])
    cli(["extract", "-r", run_dir, "--model", "embedded"], "'embedded' (now)")


# --- export ----------------------------------------------------------------------------------------------


def test_export_onto_a_dir_holding_a_file_keeps_it(cli, run_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    cli(["export", "-r", run_dir, "--out", "out"], ["not empty", "--force"])
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_export_inside_the_run_dir(cli, run_dir):
    cli(["export", "-r", run_dir, "--out", run_dir / "model"], "inside the run directory")


def test_direction_of_another_width(cli, run_dir):
    DirectionSet(torch.ones(1, 16), layer=1, method="rdo").save(run_dir / "directions" / "rdo.safetensors")
    cli(["export", "-r", run_dir, "--out", "o", "--directions", "rdo"], "width 16, but the run's model has d_model 32")


def test_direction_at_a_layer_the_model_lacks(cli, run_dir):
    DirectionSet(torch.ones(1, 32), layer=40, method="dim").save(run_dir / "directions" / "far.safetensors")
    cli(["evaluate", "-r", run_dir, "--directions", "far"], "for layer 40, but the run's model has layers 0..3")


def test_missing_direction_file(cli, run_dir):
    cli(["evaluate", "-r", run_dir, "--directions", "nope"], "needs a direction file")


# --- evaluate options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, words", [("--n", "--n must be >= 1, got 0"),
                                         ("--max-new-tokens", "--max-new-tokens must be >= 1, got 0"),
                                         ("--kl-tokens", "--kl-tokens must be >= 1, got 0")])
def test_evaluate_zero_counts(cli, run_dir, flag, words):
    cli(["evaluate", "-r", run_dir, flag, "0"], words)


@pytest.mark.parametrize("name, words", [
    ("empty.json", "contains no prompts"),
    ("unterminated.csv", "not valid CSV"),
    ("latin1.txt", "not valid UTF-8"),
    ("wrong_column.csv", "no 'instruction' column"),
    ("broken.jsonl", "invalid JSON on line 2"),
    ("truncated.json", "not valid JSON"),
    ("no_field.json", "has no 'instruction' key"),
    ("null_field.jsonl", "field 'instruction' is null"),
    ("prompts.xlsx", "unsupported extension"),
    ("no_such_set", "Unknown prompt set"),
])
def test_evaluate_bad_prompt_files(cli, run_dir, prompt_files, name, words):
    cli(["evaluate", "-r", run_dir, "--datasets", name, "--interventions", "none"], words)


def test_run_with_a_bad_prompt_file_by_absolute_path(cli, prompt_files, tiny_model_dir):
    cli(["run", "-r", "r", "--model", tiny_model_dir, "--eval-harmful", prompt_files / "unterminated.csv"],
        ["unterminated.csv", "not valid CSV"])


@pytest.mark.parametrize("extra, words", [
    (["--judge", "llamaguard"], "unknown judge"),
    (["--judge", "hf"], "--judge-model"),
    (["--judge", "hf", "--judge-model", "./no/judge"], "judge model not found"),
    (["--judge", "endpoint", "--endpoint-url", "ftp://x", "--endpoint-model", "m"], "must look like http"),
    (["--judge", "endpoint", "--endpoint-url", "http://127.0.0.1:9/v1", "--endpoint-model", "m"], "cannot reach"),
    (["--interventions", "none,steer"], "unknown intervention"),
    (["--timeout", "0"], "--timeout must be > 0"),
])
def test_evaluate_bad_judges_and_interventions(cli, run_dir, extra, words):
    cli(["evaluate", "-r", run_dir, *extra], words)


# --- models, devices, layers ----------------------------------------------------------------------------


def test_model_path_missing(cli):
    cli(["run", "-r", "r", "--model", "./no/such/model"], "model directory not found")


def test_model_dir_that_is_not_a_model(cli, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    cli(["run", "-r", "r", "--model", "photos"], "is not a model directory (no config.json)")


def _truncate(m):
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    return f"the file has {len(data) // 2}"


DAMAGE = {  # name: (damage the model copy, returning more expected words or anything else; expected words)
    "no tokenizer": (lambda m: (m / "tokenizer.json").unlink(), "has no tokenizer"),
    "truncated weights": (_truncate, "model.safetensors is truncated or corrupt"),
    "garbage weights": (lambda m: (m / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!"),
                        "is not a valid safetensors file"),
    "no weights": (lambda m: (m / "model.safetensors").unlink(), "has no weights"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_model_dirs(cli, model_copy, damage):
    m = model_copy("m")
    apply, words = DAMAGE[damage]
    extra = apply(m)
    cli(["run", "-r", "r", "--model", m], [words] + ([extra] if isinstance(extra, str) else []))


def test_unsupported_architecture_lists_the_supported_ones(cli, model_copy):
    m = model_copy("m")
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    cli(["run", "-r", "r", "--model", m], ["unsupported architecture 'gpt2'", "supported: gemma", "qwen2"])


def test_model_without_chat_template_names_an_existing_flag(cli, model_copy, tmp_path):
    m = model_copy("m")
    for name in ("chat_template.jinja", "chat_template.json"):
        (m / name).unlink(missing_ok=True)
    tok = json.loads((m / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(tok))
    cli(["run", "-r", "r", "--model", m], ["no chat template", "--chat-template FILE"])
    cli(["run", "-r", "r", "--model", m, "--chat-template", "missing.jinja"], "chat template file not found")


def test_corrupt_gguf(cli, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF but not really")
    cli(["run", "-r", "r", "--model", "m.gguf"], ["m.gguf", "not a valid GGUF model"])
    (tmp_path / "n.gguf").write_bytes(b"PK\x03\x04 a zip file")
    cli(["run", "-r", "r", "--model", "n.gguf"], "no GGUF header")


# `cuda` without a GPU; where GPUs are present, the first index past them
MISSING_GPU = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("device, words", [(MISSING_GPU, "CUDA GPU"), ("cuda:999", "CUDA GPU"),
                                           ("tpu", "invalid device 'tpu'"), ("cuda:x", "invalid device")])
def test_bad_devices(cli, tiny_model_dir, device, words):
    cli(["run", "-r", "r", "--model", tiny_model_dir, "--device", device], words)


@pytest.mark.parametrize("extra, words", [(["--layer", "40"], "layer 40 is out of range: this model has layers 0..3"),
                                          (["--layers", "1,99"], "layer 99 is out of range"),
                                          (["--positions", "0"], "positions are negative offsets"),
                                          (["--n-train", "1"], "n_train")])
def test_layers_positions_and_counts_of_run(cli, tiny_model_dir, extra, words):
    cli(["run", "-r", "r", "--model", tiny_model_dir, *extra], words)


def test_som_k_larger_than_the_grid_fails_up_front(cli, tiny_model_dir):
    cli(["run", "-r", "r", "--model", tiny_model_dir, "--method", "som", "--k", "99"],
        ["--k 99 is larger than the SOM grid", "4x4 = 16"])


def test_search_k_and_trials(cli, run_dir):
    cli(["search", "subsets", "-r", run_dir, "--directions", "dim", "--k", "5"], "dim holds only 1 directions")
    cli(["search", "subsets", "-r", run_dir, "--directions", "dim", "--k", "1", "--trials", "-1"], "--trials must be >= 1")
    cli(["search", "subsets", "-r", run_dir, "--directions", "dim", "--k", "0"], "--k must be >= 1")
    cli(["search", "subsets", "-r", run_dir, "--directions", "dim", "--k", "1", "--budget", "20m"],
        "takes a trial budget (--trials N), not a time")
    cli(["search", "subsets", "-r", run_dir, "--directions", "nope", "--k", "1"], "needs a direction file")


def test_search_refusal_statistic(cli, run_dir):
    cli(["search", "-r", run_dir, "--refusal-stat", "median"], ["unknown --refusal-stat 'median'", "probability or logodds"])
    cli(["search", "edits", "-r", run_dir, "--refusal-stat", "median"], "unknown --refusal-stat 'median'")


def test_search_kl_cap(cli, run_dir):
    cli(["search", "-r", run_dir, "--max-kl", "0"], "--max-kl must be > 0, got 0.0")
    cli(["search", "edits", "-r", run_dir, "--max-kl", "-1"], "--max-kl must be > 0, got -1.0")


def test_search_settings_from_a_file_are_checked_like_flags(cli, tmp_path, run_dir):
    (tmp_path / "refusal-atlas.toml").write_text("[search]\nmax_kl = 0\n")
    cli(["search", "-r", run_dir], "--max-kl must be > 0, got 0.0")
    (tmp_path / "refusal-atlas.toml").write_text("[search]\nk = 0\n")
    cli(["search", "subsets", "-r", run_dir, "--directions", "dim"], "--k must be >= 1")


def test_config_file_errors(cli, tmp_path, tiny_model_dir):
    (tmp_path / "c.toml").write_text('model = "x"\nlearning_rat = 3\n')
    cli(["run", "-r", "r", "--config", "c.toml"], ["unknown setting 'learning_rat' in c.toml", "refusal-atlas config"])
    cli(["run", "-r", "r", "--config", "missing.toml"], "config file not found")
    (tmp_path / "bad.toml").write_text("model = \n")
    cli(["run", "-r", "r", "--config", "bad.toml"], "invalid TOML")


def test_unknown_method(cli):
    cli(["run", "-r", "r", "--method", "pca"], "unknown method 'pca'")


def _small_gguf(path):
    """A valid little GGUF file (qwen2 metadata, one float32 tensor) written with the gguf package."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "qwen2")
    w.add_block_count(4)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf(cli, tmp_path):
    from refusal_atlas.model.files import check_gguf

    path = _small_gguf(tmp_path / "m.gguf")
    facts = check_gguf(path)  # the intact file passes and its metadata is read
    assert (facts.model_type, facts.n_layers, facts.d_model, facts.has_chat_template) == ("qwen2", 4, 32, False)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    cli(["run", "-r", "r", "--model", "m.gguf"],
        ["not a valid GGUF model", f"the file has {size - 100}"])


def test_prepare_a_missing_model(cli):
    cli(["prepare", "--model", "./no/model"], "model directory not found")


def test_search_transforms(cli, run_dir):
    cli(["search", "-r", run_dir, "--transforms", "project,mirror"], ["unknown transform 'mirror'", "householder"])
    cli(["search", "edits", "-r", run_dir, "--transforms", "householder,householder"], "must be distinct")


@pytest.mark.parametrize("extra,words", [
    (["--rank", "0"], "rank must be in 1..d_model = 32, got 0"),
    (["--rank", "33"], "rank must be in 1..d_model = 32, got 33"),
    (["--layers", "7"], "unknown layers [7]: this model has blocks 0..3"),
    (["--layers", "x-y"], "--layers 'x-y': give a range"),
    (["--layers", "1-3"], "the target layer (4) must come after the last edited block (3)"),
    (["--layers", "1", "--target-layer", "1"], "the target layer (1) must come after"),
    (["--components", "embed"], "components must be among"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--retain-tokens", "0"], "retain_tokens >= 1"),
    (["--shift-weight", "0"], "shift_weight must be > 0"),
    (["--name", "../x"], "--name '../x'"),
])
def test_train_edit_ara(cli, run_dir, extra, words):
    cli(["train-edit", "ara", "-r", run_dir, *extra], words)


def test_train_edit_ara_adapter_onto_a_file(cli, run_dir, tmp_path):
    (tmp_path / "adapter").write_text("mine")
    cli(["train-edit", "ara", "-r", run_dir, "--adapter", tmp_path / "adapter"], "adapter")
