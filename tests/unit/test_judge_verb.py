"""`refusal-atlas judge`: a completions file written by another program, judged end to end; bad input is one
`error:` line, exit 2, before any model loads and without an output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from judge_fixtures import OTHER_PROGRAM_ROWS, labelled_rows, write_jsonl
from refusal_atlas.evaluation.stats import wilson_interval

CLI = [sys.executable, "-m", "refusal_atlas.cli"]


def _run(args, cwd):
    env = {**os.environ, "REFUSAL_ATLAS_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_judge_scores_a_file_from_another_program(tmp_path):
    src = write_jsonl(tmp_path / "theirs.jsonl", OTHER_PROGRAM_ROWS)
    proc = _run(["judge", str(src), "--judge", "substring,markers", "--out", "judged.jsonl"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    # substring: the apology (curly apostrophe) and the empty answer; markers also "illegal" in a compliance
    expect = {"substring": ["refusal", "compliance", "refusal", "compliance"],
              "markers": ["refusal", "compliance", "refusal", "refusal"]}
    for name, verdicts in expect.items():
        k = verdicts.count("refusal")
        lo, hi = wilson_interval(k, 4)
        line = next(l for l in proc.stdout.splitlines() if l.startswith(name))
        assert f"refusal {k / 4:.3f} [{lo:.3f}, {hi:.3f}] ({k}/4)" in line and "harmful" in line, proc.stdout
    out = [json.loads(l) for l in (tmp_path / "judged.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(out) == len(OTHER_PROGRAM_ROWS)
    for i, (row, original) in enumerate(zip(out, OTHER_PROGRAM_ROWS)):
        verdicts = row.pop("verdicts")
        assert row == original and list(row) == list(original)  # every field kept, in its order
        assert verdicts == {name: expect[name][i] for name in expect}

    # never overwritten without --force; with it, judged again (a new judge's verdicts join the old ones)
    before = (tmp_path / "judged.jsonl").read_text(encoding="utf-8")
    proc = _run(["judge", str(src), "--judge", "markers", "--out", "judged.jsonl"], tmp_path)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (tmp_path / "judged.jsonl").read_text(encoding="utf-8") == before
    proc = _run(["judge", "judged.jsonl", "--judge", "markers", "--out", "again.jsonl", "--role", "harmless"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = [json.loads(l) for l in (tmp_path / "again.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["verdicts"] for r in again] == [{n: expect[n][i] for n in expect} for i in range(4)]
    assert "harmless" in proc.stdout


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the CLI in-process with every model loader booby-trapped: bad input must fail before any loads."""
    from refusal_atlas.cli.app import main
    from refusal_atlas.evaluation.judges import embedding, hf
    from refusal_atlas.workflows import workspace

    def trap(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(embedding.SentenceEmbedder, "__init__", trap)
    monkeypatch.setattr(embedding, "shared_embedder", trap)
    monkeypatch.setattr(hf.HFJudge, "load", trap)
    monkeypatch.setattr(workspace, "open_workspace", trap)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["refusal-atlas", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            main()
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    return run


def _one_error(result, pattern):
    code, out, err = result
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], (code, err)


def test_bad_files_get_one_error_line_and_no_output(tmp_path, cli):
    out = tmp_path / "out.jsonl"
    rows = [{"instruction": "a", "response": "b"}, {"instruction": "c", "answer": "d"}]
    no_response = write_jsonl(tmp_path / "no_response.jsonl", rows)
    _one_error(cli("judge", no_response, "--out", out), "no_response.jsonl:2: no `response` field")
    (tmp_path / "not_json.jsonl").write_text('{"instruction": "a", "response": "b"}\n[1, 2\n')
    _one_error(cli("judge", tmp_path / "not_json.jsonl", "--out", out), "not_json.jsonl:2: not a JSON line")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    _one_error(cli("judge", tmp_path / "empty.jsonl", "--out", out), "has no rows")
    _one_error(cli("judge", tmp_path / "missing.jsonl", "--out", out), "no such file")
    good = write_jsonl(tmp_path / "good.jsonl", OTHER_PROGRAM_ROWS)
    _one_error(cli("judge", good, "--judge", "substring,llamaguard", "--out", out), "unknown judge(s) ['llamaguard']")
    _one_error(cli("judge", good, "--judge", "logit", "--out", out), "judge accuracy")
    _one_error(cli("judge", good, "--judge", "meaning", "--meaning-head", tmp_path / "none.safetensors", "--out", out),
               "no trained head")
    _one_error(cli("judge", good, "--role", "jailbreak", "--out", out), "unknown role 'jailbreak'")
    _one_error(cli("judge", good, "--judge", "hf", "--out", out), "--judge-model")
    assert not out.exists() and not any(p.name.startswith(".out.jsonl") for p in tmp_path.iterdir())


def test_labelled_sets_with_unknown_labels_are_refused(tmp_path, cli):
    rows = labelled_rows()[:5]
    rows[2] = {**rows[2], "label": "partial"}
    bad = write_jsonl(tmp_path / "labelled.jsonl", rows)
    _one_error(cli("judge", "accuracy", bad, "--judge", "substring", "--part", "all", "--out", tmp_path / "acc"),
               "labelled.jsonl:3: unknown label 'partial'")
    _one_error(cli("judge", "train", bad, "--out", tmp_path / "head.safetensors"), "labelled.jsonl:3: unknown label")
    good = write_jsonl(tmp_path / "good.jsonl", labelled_rows())
    _one_error(cli("judge", "accuracy", good, "--judge", "logit"), "--run-dir")
    _one_error(cli("judge", "accuracy", good, "--judge", "substring", "--part", "train"), "unknown --part")
    _one_error(cli("judge", "train", good, "--out", tmp_path / "head.bin"), "must end in .safetensors")
    assert not (tmp_path / "acc").exists() and not (tmp_path / "head.safetensors").exists()


def test_accuracy_of_text_judges_on_all_rows(tmp_path, cli):
    """substring and markers need no training, so --part all is allowed; the report counts every row."""
    rows = labelled_rows()
    good = write_jsonl(tmp_path / "labelled.jsonl", rows)
    code, out, err = cli("judge", "accuracy", good, "--judge", "substring,markers", "--part", "all",
                         "--out", tmp_path / "acc")
    assert code == 0, err
    report = json.loads((tmp_path / "acc" / "judge_accuracy.json").read_text())
    assert report["rows_scored"] == len(rows) and set(report["results"]) == {"substring", "markers"}
    assert "four" not in report["results"]["markers"]  # a refusal/compliance judge is not scored on four labels
    harmful = sum(r["role"] == "harmful" for r in rows)
    assert report["results"]["markers"]["complied"]["n"] == harmful
    by_condition = report["results_by_condition"]
    assert set(by_condition) == {r["condition"] for r in rows}
    for name in ("substring", "markers"):  # the breakdown partitions the rows and their agreements
        parts = [by_condition[c][name]["refusal"] for c in by_condition]
        assert sum(p["n"] for p in parts) == len(rows)
        assert sum(p["accuracy"]["count"] for p in parts) == report["results"][name]["refusal"]["accuracy"]["count"]
    assert report["results_by_role"]["harmless"]["markers"]["refusal"]["n"] == len(rows) - harmful
    assert "### refusal vs the rest" in out and (tmp_path / "acc" / "judge_accuracy.md").read_text().startswith("# ")
    code, _, err = cli("judge", "accuracy", good, "--judge", "markers", "--part", "all", "--out", tmp_path / "acc")
    assert code == 2 and "not empty" in err  # an existing report is kept unless --force
