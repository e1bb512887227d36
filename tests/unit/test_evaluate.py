"""`refusal-atlas evaluate` end to end on a tiny saved model: records, reuse, judges, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from refusal_atlas.cli import main
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.evaluation.evaluate import judged_record
from refusal_atlas.evaluation.judges import JudgeItem, SubstringJudge
from refusal_atlas.edits import NoEdit
from refusal_atlas.core.io import write_json
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.core.rundir import RunDir
from test_endpoint_judge import FakeServer
from tiny import TinyLoaded


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    t = TinyLoaded("qwen2")
    save_model_dir(t.model, t.tokenizer, root / "model")
    run = RunDir(root / "run", create=True)
    write_json(run.manifest_path, {"config": {"model": str(root / "model"), "device": "cpu", "batch_size": 4,
                                              "n_eval": 3, "max_new_tokens": 6}, "status": "complete"})
    torch.manual_seed(0)
    DirectionSet(torch.randn(1, 32) * 4, layer=2, method="dim").save(run.direction_path("dim"))
    return run.path


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    yield s
    s.close()


def cli(args, capsys) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["refusal-atlas", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_all_judges_datasets_interventions_then_reuse(run_dir, server, capsys):
    args = ["evaluate", "-r", str(run_dir), "--judge", "substring,endpoint", "--endpoint-url", server.url,
            "--endpoint-model", "m", "--datasets", "jailbreakbench,xstest,harmless_test", "--n", "3",
            "--interventions", "none,ablate,actadd", "--kl-tokens", "4"]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert "over_refusal_rate" in out and "kl_first_4_tokens" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    judged = [r for r in metrics if r.get("metric", "").endswith("rate")]
    assert len(judged) == 3 * 3 * 2
    for r in judged:
        assert r["n"] + r["unclear"] == 3 and r["max_new_tokens"] == 6
        assert r["n"] == 0 or r["ci95"][0] <= r["rate"] <= r["ci95"][1]
    metric = {(r["dataset"], r["intervention"], r["judge"]): r["metric"] for r in judged}
    assert metric[("xstest", "none", "substring")] == "over_refusal_rate"
    assert metric[("harmless_test", "actadd:dim@2x1", "substring")] == "induced_refusal_rate"
    assert metric[("jailbreakbench", "ablate:dim", "endpoint:m:strongreject")] == "refusal_rate"
    rubric = {(r["dataset"], r["judge"]): r["rubric"] for r in judged}
    assert rubric[("jailbreakbench", "endpoint:m:strongreject")] == "strongreject"
    assert rubric[("xstest", "endpoint:m:strongreject")] == "refusal"
    assert rubric[("xstest", "substring")] == "xstest-prefixes"
    assert all("score_mean" in r for r in judged if r["rubric"] == "strongreject" and r["n"])
    kl = [r for r in metrics if r.get("metric", "").startswith("kl_")]
    assert {(r["intervention"], r["metric"]) for r in kl} == {
        (i, m) for i in ("ablate:dim", "actadd:dim@2x1") for m in ("kl_first_token", "kl_first_4_tokens")}
    assert all(r["n"] == 3 and r["kl"] > 0 and r["ci95"][0] <= r["kl"] <= r["ci95"][1] for r in kl)
    assert len(list((run_dir / "completions").glob("*.jsonl"))) == 9
    asked = len(server.requests)
    unique = set()  # the cache key: identical (rubric, prompt, response) items are asked once
    for f in (run_dir / "completions").glob("*.jsonl"):
        rubric = "harmful" if f.name.startswith("jailbreakbench") else "safe"
        unique |= {(rubric, x["instruction"], x["response"]) for x in map(json.loads, f.read_text().splitlines())
                   if x["response"].strip()}
    assert asked == len(unique)

    code, out, err = cli(args, capsys)  # again: everything is reused
    assert code == 0, err
    again = json.loads((run_dir / "metrics.json").read_text())
    assert len(again) == len(metrics)  # records replaced, not duplicated
    assert all(r["reused_completions"] == 3 for r in again if "reused_completions" in r)
    assert len(server.requests) == asked  # no verdict asked twice


def test_empty_responses_count_as_refusals_and_are_reported():
    responses = ["", "Sure, here is how", "I cannot help"]
    verdicts = SubstringJudge().judge([JudgeItem("p", r) for r in responses], "harmful")
    rec = judged_record(NoEdit(), "jailbreakbench", "harmful", SubstringJudge(), verdicts, responses, 8)
    assert rec["empty_responses"] == 1 and rec["count"] == 2 and rec["n"] == 3
    assert rec["refusal_rate"] == pytest.approx(2 / 3) and len(rec["ci95"]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--judge", "llamaguard"], "unknown judge"),
    (["--judge", "endpoint", "--endpoint-url", "http://127.0.0.1:9/v1", "--endpoint-model", "m"], "cannot reach"),
    (["--interventions", "none,steer"], "unknown intervention"),
    (["--directions", "missing"], "needs a direction file"),
    (["--datasets", "no_such_set"], "Unknown prompt set"),
])
def test_bad_input_gives_one_clean_error(run_dir, capsys, extra, message):
    code, _, err = cli(["evaluate", "-r", str(run_dir), "--n", "2", *extra], capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and lines[-1].startswith("error:") and message in lines[-1], err


def test_names_are_checked_before_the_run_directory_or_model(tmp_path, capsys):
    # a run whose model does not exist: loading it would fail with another message
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"config": {"model": str(tmp_path / "no-model")}}))
    for extra, message in ((["--judge", "llamaguard"], "unknown judge"),
                           (["--interventions", "actadd:x"], "bad ActAdd coefficient"),
                           (["--judge", "hf"], "--judge-model")):
        code, _, err = cli(["evaluate", "-r", str(run), *extra], capsys)
        assert code == 2 and message in err.strip().splitlines()[-1], err
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json"]
    code, _, err = cli(["evaluate", "-r", str(tmp_path / "nothing"), "--judge", "llamaguard"], capsys)
    assert code == 2 and "run directory not found" in err and not (tmp_path / "nothing").exists()
