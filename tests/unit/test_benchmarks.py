"""lm-eval capability runs on a tiny model, offline: local tasks, interventions active, records."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_atlas.core.errors import ConfigError, DataError
from refusal_atlas.evaluation.benchmarks import local_task_dir, resolve_tasks, run_benchmarks, yaml_task
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.model import ModelAdapter

TASK_YAML = """task: tiny_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/tiny_words.json
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
QUESTIONS = [  # words from the tiny vocabulary, so the choices really differ
    ("what is the weather", ["cake", "bomb", "money", "joke"], 0),
    ("tell joke please", ["house", "joke", "colors", "poem"], 1),
    ("give me recipe", ["cats", "computer", "cake", "money"], 2),
    ("how to build house", ["step", "two", "three", "house"], 3),
    ("list three colors", ["one", "two", "three", "first"], 2),
    ("write poem about cats", ["poem", "cats", "house", "bomb"], 0),
]


@pytest.fixture
def tiny_task(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny_words.json").write_text(
        json.dumps([{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]))
    path = tmp_path / "tiny_words.yaml"
    path.write_text(TASK_YAML)
    return path


def test_shipped_smoke_task_resolves_to_an_absolute_data_file():
    specs, builtin = resolve_tasks(["smoke"])
    assert not builtin and specs[0]["task"] == "refusal_atlas_smoke"
    data = specs[0]["dataset_kwargs"]["data_files"]["test"]
    rows = json.loads(open(data, encoding="utf-8").read())
    assert len(rows) == 20 and all(0 <= r["answer"] < len(r["choices"]) for r in rows)
    assert (local_task_dir() / "refusal_atlas_smoke.yaml").is_file()


def test_run_with_and_without_ablation(tiny, tiny_task):
    adapter = ModelAdapter(tiny.model)
    base = run_benchmarks(tiny.model, tiny.tokenizer, [str(tiny_task)], limit=4, batch_size=4)
    assert len(base) == 1
    rec = base[0]
    assert rec["dataset"] == "tiny_words" and rec["metric"] == "benchmark:acc" and rec["n"] == 4
    assert 0.0 <= rec["rate"] <= 1.0 and rec["ci95"][0] <= rec["rate"] <= rec["ci95"][1]
    assert rec["count"] == round(rec["rate"] * 4) and rec["judge"] == "lm-eval"

    torch.manual_seed(0)
    spec = DirectionalAblation.from_directions(torch.randn(1, adapter.d_model) * 3)
    ablated = run_benchmarks(tiny.model, tiny.tokenizer, [str(tiny_task)], adapter=adapter, intervention=spec,
                             limit=4, batch_size=4)[0]
    again = run_benchmarks(tiny.model, tiny.tokenizer, [str(tiny_task)], limit=4, batch_size=4)[0]
    assert ablated["gold_loglik_mean"] != pytest.approx(rec["gold_loglik_mean"], abs=1e-4)  # hooks were active
    assert again["gold_loglik_mean"] == pytest.approx(rec["gold_loglik_mean"], abs=1e-5)  # and removed after


def test_shipped_smoke_task_runs_offline(tiny):
    recs = run_benchmarks(tiny.model, tiny.tokenizer, ["smoke"], limit=3, batch_size=4)
    assert recs[0]["dataset"] == "refusal_atlas_smoke" and recs[0]["n"] == 3 and "acc_norm" in recs[0]["values"]


def test_bad_task_inputs(tmp_path, tiny):
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        run_benchmarks(tiny.model, tiny.tokenizer, ["no_such_task_anywhere"], limit=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(TASK_YAML)  # its data file does not exist
    with pytest.raises(DataError, match="data file"):
        yaml_task(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="'task' key"):
        yaml_task(tmp_path / "list.yaml")
