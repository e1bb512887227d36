"""Metrics rows and completions name the artifact that made them (file name + content fingerprint)."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import DirectionalAblation, NoEdit
from refusal_atlas.core.io import write_json
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.core.rundir import RunDir
from test_evaluate import cli
from tiny import TinyLoaded


@pytest.fixture
def run_dir(tmp_path):
    t = TinyLoaded("qwen2")
    save_model_dir(t.model, t.tokenizer, tmp_path / "model")
    run = RunDir(tmp_path / "run", create=True)
    write_json(run.manifest_path, {"config": {"model": str(tmp_path / "model"), "device": "cpu", "batch_size": 4,
                                              "n_eval": 3, "max_new_tokens": 3}, "status": "complete"})
    gen = torch.Generator().manual_seed(0)
    for name in ("rdo_a", "rdo_b"):  # two RDO files of one method, as `directions rdo --name` writes them
        DirectionSet(4 * torch.randn(1, 32, generator=gen), layer=2, method="rdo", position=None).save(
            run.direction_path(name))
    return run


def _evaluate(run: RunDir, name: str, capsys) -> None:
    code, _, err = cli(["evaluate", "-r", str(run.path), "--directions", name, "--interventions", "ablate",
                        "--datasets", "jailbreakbench", "--n", "3"], capsys)
    assert code == 0, err


def test_two_direction_files_of_one_method_get_two_rows(run_dir, capsys):
    _evaluate(run_dir, "rdo_a", capsys)
    _evaluate(run_dir, "rdo_b", capsys)
    rows = [r for r in run_dir.metrics() if r["dataset"] == "jailbreakbench"]
    assert len(rows) == 2
    assert {r["intervention"] for r in rows} == {"ablate:rdo_a", "ablate:rdo_b"}
    assert {r["directions"] for r in rows} == {"rdo_a", "rdo_b"} and all(r["method"] == "rdo" for r in rows)
    fingerprints = {r["directions"]: r["fingerprint"] for r in rows}
    for name, fp in fingerprints.items():
        assert fp == DirectionSet.load(run_dir.direction_path(name)).fingerprint() and len(fp) == 16
    assert fingerprints["rdo_a"] != fingerprints["rdo_b"]


def test_a_replaced_direction_file_gets_its_own_row_and_fresh_completions(run_dir, capsys):
    _evaluate(run_dir, "rdo_a", capsys)
    old = DirectionSet.load(run_dir.direction_path("rdo_a"))
    DirectionSet(-old.vectors, old.layer, "rdo", None).save(run_dir.direction_path("rdo_a"))
    _evaluate(run_dir, "rdo_a", capsys)
    rows = [r for r in run_dir.metrics() if r["intervention"] == "ablate:rdo_a"]
    assert len(rows) == 2 and rows[0]["fingerprint"] != rows[1]["fingerprint"]
    assert rows[1]["reused_completions"] == 0  # the first direction's completions were not reused
    lines = [json.loads(x) for x in (run_dir.path / "completions" / "jailbreakbench__ablate_rdo_a.jsonl")
             .read_text().splitlines()]
    assert len({x["fingerprint"] for x in lines}) == 2 and len(lines) == 6
    _evaluate(run_dir, "rdo_a", capsys)  # the same direction again: its row is replaced, completions reused
    rows = [r for r in run_dir.metrics() if r["intervention"] == "ablate:rdo_a"]
    assert len(rows) == 2 and rows[-1]["reused_completions"] == 3


def test_label_and_fingerprint_of_an_edit_of_a_direction_set():
    d = DirectionSet(torch.ones(1, 8), layer=1, method="dim")
    assert DirectionalAblation.from_directions(d).label == "ablate:dim"  # not loaded from a file: the method names it
    d.name = "dim_l1"
    spec = DirectionalAblation.from_directions(d)
    assert spec.label == "ablate:dim_l1" and spec.describe()["fingerprint"] == d.fingerprint()
    moved = DirectionSet(torch.ones(1, 8), layer=2, method="dim")
    assert moved.fingerprint() != d.fingerprint()  # the layer is part of the identity
    raw = DirectionalAblation.from_directions(torch.ones(1, 8), layer=1)
    assert raw.describe()["fingerprint"] == d.fingerprint() and raw.label == "ablate:custom"
    assert NoEdit().describe().get("fingerprint") is None and NoEdit().label == "none"


def test_heldout_comparison_never_reuses_another_directions_row():
    from refusal_atlas.workflows.som import _existing

    a = DirectionalAblation.from_directions(DirectionSet(torch.ones(1, 8), layer=1, method="dim"))
    b = DirectionalAblation.from_directions(DirectionSet(-torch.ones(1, 8), layer=1, method="dim"))
    rows = [{**a.describe(), "dataset": "jailbreakbench", "judge": "substring", "n": 4, "max_new_tokens": 2}]
    assert _existing(rows, a, "jailbreakbench", 4, 2, False) is rows[0]
    assert b.label == a.label and _existing(rows, b, "jailbreakbench", 4, 2, False) is None


def test_compare_shows_one_row_per_direction_file(run_dir, capsys, tmp_path):
    """`refusal-atlas compare` on a run with two RDO files of different names: two rows, by artifact."""
    _evaluate(run_dir, "rdo_a", capsys)
    _evaluate(run_dir, "rdo_b", capsys)
    code, out, err = cli(["compare", str(run_dir.path), "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    ablated = [r for r in rows if r["kind"] == "ablate"]
    assert sorted(r["intervention"] for r in ablated) == ["ablate:rdo_a", "ablate:rdo_b"]
    fps = {r["intervention"]: r["fingerprint"] for r in ablated}
    assert fps["ablate:rdo_a"] == DirectionSet.load(run_dir.direction_path("rdo_a")).fingerprint()
    assert fps["ablate:rdo_a"] != fps["ablate:rdo_b"]
    for r in ablated:  # each row carries its own measured rate with n and an interval
        cell = r["refusal"]["jailbreakbench"]
        assert cell["n"] == 3 and cell["ci95"][0] <= cell["rate"] <= cell["ci95"][1]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "ablate:rdo_a" in table and "ablate:rdo_b" in table and fps["ablate:rdo_b"] in table
    assert table in out
