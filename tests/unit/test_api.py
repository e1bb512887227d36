"""The notebook API: its docstring examples and docs/api.md run on a tiny model."""

import doctest
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import refusal_atlas
from refusal_atlas import api

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.fixture
def globs(tiny):
    return {"model": tiny.model, "tokenizer": tiny.tokenizer, "torch": torch}


def test_module_docstring_examples_run(globs):
    result = doctest.testmod(api, extraglobs=globs, optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted >= 8 and result.failed == 0


def test_docs_page_snippets_run(globs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report snippet writes a run directory here
    result = doctest.testfile(str(DOCS), module_relative=False, globs=dict(globs), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 20 and result.failed == 0


def test_public_names_are_explicit_and_lazy():
    assert set(refusal_atlas.__all__) >= {"Atlas", "DIM", "SOM", "RDO", "Search", "DirectionSet", "prompts"}
    for name in refusal_atlas.__all__:
        assert getattr(refusal_atlas, name) is not None
    # importing the package alone does not import torch (the CLI's fail-fast paths stay fast)
    code = "import sys, refusal_atlas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_estimators_are_keyword_only_and_slicing_keeps_ids(tiny):
    with pytest.raises(TypeError):
        api.DIM(2)  # type: ignore[misc]
    d = refusal_atlas.DirectionSet(torch.randn(5, 8), 1, "som", -1, ids=[9, 7, 5, 3, 1])
    assert d[:3].ids == [9, 7, 5] and d[-1].ids == [1] and torch.equal(d[1:3].vectors, d.vectors[1:3])
