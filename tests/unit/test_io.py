"""Atomic writes: a failure leaves the previous artifact (or nothing) and no temporary files."""

from __future__ import annotations

import pytest

import os
import stat

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import atomic_dir, read_json, write_json


def test_atomic_dir_replaces_the_directory_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError):
        with atomic_dir(target, force=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "first"  # untouched

    with pytest.raises(ConfigError, match="not empty"):  # a non-empty directory is never replaced unasked
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]

    with atomic_dir(target, force=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_refuses_an_existing_file(tmp_path):
    (tmp_path / "f").write_text("user data")
    with pytest.raises(ConfigError, match="existing file"):
        with atomic_dir(tmp_path / "f", force=True):
            pass
    assert (tmp_path / "f").read_text() == "user data"


def test_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["m.json"]
