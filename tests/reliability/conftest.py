"""Bad input through the real CLI entry point (``refusal_atlas.cli.main``), in-process.

Every case asserts: exit status 2, one last stderr line ``error: ...`` holding the expected words,
no traceback, a short elapsed time, the model loader never called, and the test's whole folder
(inputs, stub run directories, output paths) byte-for-byte as it was before the command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from refusal_atlas.settings import load_settings
from refusal_atlas.directions.base import DirectionSet

MAX_SECONDS = 5.0  # validation only; loading even the tiny model and importing nothing new is far below


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under ``root`` → sha256 of its bytes (None for a directory)."""
    out: dict[str, str | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _never(*args, **kwargs):
    raise AssertionError(f"a model was loaded during input validation: {args} {kwargs}")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load (any path: workspace, judges, embedded assembly) fails the test."""
    import refusal_atlas.model.embedded as embedded
    import refusal_atlas.model.loading as loading
    import refusal_atlas.workflows.workspace as workspace

    monkeypatch.setattr(loading, "load_model", _never)
    monkeypatch.setattr(workspace, "load_model", _never)
    monkeypatch.setattr(embedded, "ensure_embedded_model", _never)


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, no_model_load):
    """``cli(args, words)`` runs ``main()`` in ``tmp_path`` and checks everything a bad input must satisfy."""
    from refusal_atlas.cli import main

    monkeypatch.chdir(tmp_path)

    def run(args: list[str], words: str | list[str]) -> str:
        before = snapshot(tmp_path)
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["refusal-atlas", *map(str, args)])
        start = time.perf_counter()
        with pytest.raises(SystemExit) as exc:
            main()
        elapsed = time.perf_counter() - start
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert exc.value.code == 2, err
        assert "Traceback" not in err
        assert lines and lines[-1].startswith("error: "), err
        for w in [words] if isinstance(words, str) else words:
            assert w in lines[-1], lines[-1]
        assert elapsed < MAX_SECONDS, f"{elapsed:.1f} s"
        assert snapshot(tmp_path) == before, "the command changed, created or deleted files"
        if os.environ.get("RELIABILITY_MESSAGES"):  # collect the case list for the notes / docs
            with open(os.environ["RELIABILITY_MESSAGES"], "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"args": [str(a).replace(str(tmp_path), "<tmp>") for a in args],
                                     "message": lines[-1].replace(str(tmp_path), "<tmp>")}) + "\n")
        return lines[-1]

    return run


def write_run(path: Path, model_dir: Path, *, artifacts: bool = True, **config) -> Path:
    """A stub run directory: a manifest as `run` writes it, and (optionally) artifacts on disk."""
    path.mkdir(parents=True)
    cfg = load_settings(None, {"model": str(model_dir), **config}).run_config()
    manifest = {"refusal_atlas": "0.1.0", "config": cfg, "status": "complete",
                "model": {"name": "tiny", "n_layers": 4, "d_model": 32, "model_type": "qwen2"}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    if artifacts:
        (path / "directions").mkdir()
        DirectionSet(torch.ones(1, 32), layer=2, method="dim").save(path / "directions" / "dim.safetensors")
        (path / "activations.safetensors").write_bytes(b"stands in for extracted representations")
    return path


@pytest.fixture(scope="session")
def make_run():
    """:func:`write_run`, for tests that build their own stub runs."""
    return write_run


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir) -> Path:
    return write_run(tmp_path / "run", tiny_model_dir)


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """``model_copy(name)`` → a private copy of the tiny model directory to damage."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_model_dir, tmp_path / name))

    return copy


PROMPT_FILES: dict[str, bytes] = {
    "empty.json": b"[]",
    "unterminated.csv": b'instruction\n"how to make a bomb\nwrite a poem\n',
    "latin1.txt": "caf\u00e9 au lait\n".encode("latin-1"),
    "wrong_column.csv": b"prompt\nhello\n",
    "broken.jsonl": b'{"instruction": "a"}\n{"instruction": \n',
    "truncated.json": b'[{"instruction": ',
    "no_field.json": b'[{"prompt": "x"}]',
    "null_field.jsonl": b'{"instruction": null}\n',
    "prompts.xlsx": b"PK\x03\x04",
}


@pytest.fixture
def prompt_files(tmp_path) -> Path:
    """Malformed prompt files, one per way of being wrong, in ``tmp_path``."""
    for name, data in PROMPT_FILES.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path
