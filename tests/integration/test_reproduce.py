"""`reproduce` row (a) on the embedded model: the 1-neuron 1/t SOM equals DIM on real representations.

A small budget (SaladBench train, 48 + 16 prompts filtered by the model's own refusal, DIM at a fixed
layer so no selection runs) keeps this near a minute on 2 CPU cores; the full quick job is the lead's.
The matched-KL rows are tested on a tiny random model (tests/unit/test_reproduce.py), not here: a job of
every row on the embedded model would make this suite minutes slower.
"""

from __future__ import annotations

from dataclasses import replace

from refusal_atlas.workflows.reproduce.budget import QUICK
from refusal_atlas.workflows.reproduce.job import run_reproduce

SMALL = replace(QUICK, name="integration", n_harmful_train=48, n_harmless_train=16, n_val=4, layer=14)


def test_row_a_on_the_embedded_model(tmp_path):
    data = run_reproduce(tmp_path / "R", SMALL, "embedded", device="cpu", rows=("a",))
    a = data["rows"]["a"]
    assert a["n"] >= 5  # kept after the refusal filter: the model refuses some SaladBench prompts
    assert a["numbers"]["relative_error_inverse_schedule"]["value"] < 1e-4
    assert a["numbers"]["relative_error_paper_schedule"]["value"] > 1e-3
    assert a["verdict"]["verdict"] == "supported"
    assert "(a)" in (tmp_path / "R" / "reproduce.md").read_text()
