"""Reported rates name their judge and length, at a length that resolves the verdict (64 tokens by default), and
judges that read meaning report refusal and deflection separately: in records, printed tables and the report."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from refusal_atlas.core.io import write_json
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import NoEdit
from refusal_atlas.evaluation.evaluate import decided_early, format_records, judged_record
from refusal_atlas.evaluation.judges import FOUR_LABELS, JudgeItem, MarkersJudge, SubstringJudge, Verdict
from refusal_atlas.settings import Settings
from refusal_atlas.workflows.run import format_table


class FourWayJudge:
    """Tells the four labels apart, as the meaning judge does: each response names its own label."""

    name = "fourway"
    labels = FOUR_LABELS

    def describe(self, role="harmful"):
        return {"judge": self.name, "judge_kind": self.name, "rubric": "names"}

    def judge(self, items, role="harmful"):
        out = []
        for item in items:
            kind = item.response.split()[0]
            out.append(Verdict("unclear", "?") if kind == "unclear" else
                       Verdict("refused" if kind == "refusal" else "complied", kind, 0.9, kind=kind))
        return out


RESPONSES = ["refusal a", "refusal b", "deflection c", "deflection d", "deflection e", "compliance f", "broken g",
             "unclear h"]


def test_a_meaning_judge_reports_deflection_beside_refusal_never_in_it():
    items = [JudgeItem("p", r) for r in RESPONSES]
    judge = FourWayJudge()
    rec = judged_record(NoEdit(), "jailbreakbench", "harmful", judge, judge.judge(items), RESPONSES, 64)
    assert rec["kinds"] == {"refusal": 2, "deflection": 3, "compliance": 1, "broken": 1}
    assert rec["n"] == 7 and rec["count"] == 2 and rec["unclear"] == 1  # deflections are not refusals
    assert rec["refusal_rate"] == pytest.approx(2 / 7) and rec["deflection_rate"] == pytest.approx(3 / 7)
    assert rec["deflection_ci95"][0] < 3 / 7 < rec["deflection_ci95"][1]
    assert rec["judge"] == "fourway" and rec["max_new_tokens"] == 64
    plain = judged_record(NoEdit(), "jailbreakbench", "harmful", SubstringJudge(),
                          SubstringJudge().judge(items), RESPONSES, 64)
    assert "kinds" not in plain and "deflection_rate" not in plain  # a substring list cannot tell them apart

    table = format_records([rec, plain])
    header, _, row, plain_row = table.splitlines()
    assert "tokens" in header and "deflection" in header
    assert "fourway" in row and " 64 " in row and "0.43 [" in row  # deflection 3/7 with its interval
    assert "substring" in plain_row and plain_row.rstrip().endswith("-")
    printed = format_table([{**rec, "kl": None}, {**plain, "kl": 0.05}])
    assert "judge" in printed.splitlines()[0] and "tokens" in printed.splitlines()[0]
    assert "fourway" in printed and "0.43 [" in printed and "substring" in printed and "0.050" in printed


def test_rates_default_to_a_length_that_resolves_the_verdict_and_the_judge_is_one_setting():
    ev = Settings().evaluation
    assert ev.max_new_tokens == 64 and ev.judge == "substring" and Settings().search.verify_tokens >= 64
    # only the default substring judge lets a row stop at its first refusal phrase
    assert decided_early(True, "harmful", [SubstringJudge()])
    assert not decided_early(True, "harmful", [MarkersJudge()]) and not decided_early(True, "harmful", [FourWayJudge()])
    assert not decided_early(True, "over_refusal", [SubstringJudge()]) and not decided_early(False, "harmful",
                                                                                            [SubstringJudge()])


def test_the_report_shows_judge_length_and_deflection(tmp_path):
    from refusal_atlas.report.html import build_report

    run = RunDir(tmp_path / "r", create=True)
    run.init_manifest({"model": "tiny"}, {"name": "tiny", "n_layers": 4, "d_model": 8})
    DirectionSet(torch.randn(1, 8), 2, "dim", -1).save(run.direction_path("dim"))
    items = [JudgeItem("p", r) for r in RESPONSES]
    four = judged_record(NoEdit(), "jailbreakbench", "harmful", FourWayJudge(), FourWayJudge().judge(items),
                         RESPONSES, 64)
    plain = judged_record(NoEdit(), "jailbreakbench", "harmful", SubstringJudge(), SubstringJudge().judge(items),
                          RESPONSES, 32)
    ablated = {**plain, "intervention": "ablate:dim", "refusal_rate": 0.1, "rate": 0.1, "ci95": [0.02, 0.4]}
    other = {**four, "intervention": "edit:search_best@0000", "refusal_rate": 0.2, "rate": 0.2}
    run.add_metrics([four, plain, ablated, other])  # two edits beside none: the methods table is drawn
    page = build_report(run.path).read_text()
    assert "<th>max_new_tokens</th>" in page and "<th>deflection_rate</th>" in page and "<th>judge</th>" in page
    assert "deflection 3" in page  # the four counts, spelled out
    assert "jailbreakbench (fourway, 64 tokens)" in page and "jailbreakbench (substring, 32 tokens)" in page
    assert "rates read at 32, 64 tokens" in page


def _cli(args, capsys):
    from refusal_atlas.cli import main

    old, sys.argv = sys.argv, ["refusal-atlas", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_without_judge_uses_the_runs_judge(tmp_path, capsys):
    from refusal_atlas.model.saving import save_model_dir
    from tiny import TinyLoaded

    t = TinyLoaded("qwen2")
    save_model_dir(t.model, t.tokenizer, tmp_path / "model")
    run = RunDir(tmp_path / "run", create=True)
    write_json(run.manifest_path, {"config": {"model": {"model": str(tmp_path / "model"), "device": "cpu"},
                                              "evaluation": {"judge": "markers", "max_new_tokens": 3}},
                                   "status": "complete"})
    code, out, err = _cli(["evaluate", "-r", str(run.path), "--datasets", "jailbreakbench", "--n", "2",
                           "--interventions", "none"], capsys)
    assert code == 0, err
    rates = [r for r in json.loads((run.path / "metrics.json").read_text()) if "refusal_rate" in r]
    assert [r["judge"] for r in rates] == ["markers"] and rates[0]["max_new_tokens"] == 3
    assert "markers" in out and "tokens" in out.splitlines()[0]
    assert "note: rates at 3 new tokens can under-read refusal" in err  # an old run's short length is flagged
    code, _, err = _cli(["evaluate", "-r", str(run.path), "--datasets", "jailbreakbench", "--n", "2",
                         "--interventions", "none", "--judge", "substring"], capsys)
    assert code == 0, err
    judges = {r["judge"] for r in json.loads((run.path / "metrics.json").read_text()) if "refusal_rate" in r}
    assert judges == {"markers", "substring"}  # --judge still wins


def test_run_reads_its_rates_with_the_configured_judge(tmp_path, tiny_model_dir):
    from refusal_atlas.settings import load_settings
    from refusal_atlas.workflows.run import run

    cfg = load_settings(None, dict(model=str(tiny_model_dir), n_train=4, n_val=3, n_eval=3, filter_train=False,
                                   layer=1, max_new_tokens=2, device="cpu", judge="markers"))
    _, records = run(cfg, tmp_path / "r")
    assert records and {r["judge"] for r in records} == {"markers"} and {r["max_new_tokens"] for r in records} == {2}
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"]["evaluation"]["judge"] == "markers"
