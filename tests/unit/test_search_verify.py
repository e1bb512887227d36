"""The search's verification by generation (search/verify.py): which edits it verifies, the pick and the front by
the verified numbers, a front where proxy and generation disagree, resume after a kill mid-verification, `--verify 0`
(the proxy's pick, as before), each point's origin, and bad input before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from refusal_atlas.edits import load_edit
from refusal_atlas.evaluation.judges import Verdict
from refusal_atlas.search.edit_space import build_edit
from refusal_atlas.search.sources import EditContext
from refusal_atlas.search.verify import RULE, candidates, choose_verified, verified_front


def _rec(number, refusal, kl, rate=None, n=32):
    rec = {"number": number, "refusal": refusal, "kl": kl}
    if rate is not None:
        count = round(rate * n)
        rec["verified"] = {"rate": count / n, "count": count, "n": n, "ci95": [0.0, 1.0]}
    return rec


def test_candidates_follow_the_pick_rule_and_always_include_full_dim_ablation():
    front = [_rec(1, 0.30, 0.01), _rec(2, 0.10, 0.05), _rec(3, 0.05, 0.09), _rec(4, 0.02, 0.20), _rec(5, 0.01, 0.40)]
    # under the KL bound by lowest proxy refusal (3, 2, 1), then the rest by lowest KL (4, 5)
    assert [r["number"] for r in candidates(front, 4, 0.1)] == [3, 2, 1, 4]
    assert [r["number"] for r in candidates(front, 2, 0.1, reference=_rec(0, 0.2, 0.06))] == [3, 2, 0]
    assert [r["number"] for r in candidates(front, 2, 0.1, reference=front[2])] == [3, 2]  # not twice
    assert candidates(front, 0, 0.1, reference=_rec(0, 0.2, 0.06)) == []  # off means off


def test_the_verified_pick_uses_point_estimates_then_kl_and_falls_back_to_lowest_kl():
    recs = [_rec(1, 0.05, 0.09, rate=0.25), _rec(2, 0.01, 0.08, rate=0.0625), _rec(3, 0.20, 0.03, rate=0.0625),
            _rec(4, 0.00, 0.50, rate=0.0)]
    best, why = choose_verified(recs, 0.1)
    # 2 and 3 tie at 2/32 (their intervals overlap 1's too: not a tie, the point estimate decides); lower KL wins
    assert best["number"] == 3 and "lowest verified refusal" in why
    assert choose_verified(recs, 0.01)[0]["number"] == 3 and "fallback" in choose_verified(recs, 0.01)[1]
    assert [r["number"] for r in verified_front(recs)] == [3, 4]  # 1 and 2 are dominated by 3
    assert "point estimate" in RULE and "lowest KL" in RULE


# --- on a tiny run directory ----------------------------------------------------------------------------------
def _cli(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "REFUSAL_ATLAS_QUIET": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _copy(tiny_run, tmp_path, name="run"):
    root, _, _ = tiny_run
    return shutil.copytree(root / "run", tmp_path / name,
                           ignore=shutil.ignore_patterns("edits", "*.db", "*.lock", "search*"))


class ScriptedJudge:
    """A judge whose k-th call (the k-th verified edit) refuses ``counts[k]`` of its items: generation made to
    disagree with the proxy on purpose."""

    name = "scripted"

    def __init__(self, counts):
        self.counts, self.calls = list(counts), 0

    def describe(self, role="harmful"):
        return {"judge": self.name, "judge_kind": self.name, "rubric": "scripted"}

    def judge(self, items, role="harmful"):
        k = self.counts[self.calls] if self.calls < len(self.counts) else 0
        self.calls += 1
        return [Verdict("refused" if i < k else "complied", "scripted") for i in range(len(items))]


def test_verification_reorders_a_front_the_proxy_ranks_the_other_way(tiny_run, tmp_path, monkeypatch):
    """The proxy's favourite refuses most under generation and its least favourite never: search_best, the chosen
    record and the verified front follow generation; the proxy's pick stays beside it."""
    from refusal_atlas.settings import SearchSettings
    from refusal_atlas.workflows.search import edit_search_step, format_edit_search
    from refusal_atlas.workflows.workspace import Workspace, load_prompt_sets, reopen_workspace

    run = _copy(tiny_run, tmp_path)
    ws = reopen_workspace(run, {"kl_threshold": 1e6}, allowed=("kl_threshold",))  # every edit is under the bound
    sets = load_prompt_sets(ws.settings)
    n_val = len(sets.harmful_val)
    judge = ScriptedJudge([n_val - k for k in range(8)])  # 1st verified: all refuse, then ever fewer
    monkeypatch.setattr(Workspace, "judge", lambda self, name=None: judge)
    summary = edit_search_step(ws, sets, SearchSettings(n_startup_trials=2, verify=3), until=8)

    verified = summary["verified"]
    assert 2 <= len(verified) <= 4 and judge.calls == len(verified)
    # verified in the proxy's order (full DIM ablation last, if not among them): the proxy's pick first
    assert verified[0]["number"] == summary["proxy_chosen"]["number"]
    rates = {r["number"]: r["verified"]["rate"] for r in verified}
    assert rates[verified[0]["number"]] == 1.0 and min(rates.values()) < 1.0
    expected = min(verified, key=lambda r: (r["verified"]["rate"], r["kl"], r["number"]))
    assert summary["chosen"]["number"] == expected["number"] != summary["proxy_chosen"]["number"]
    assert summary["rule"]["name"] == "min_verified_refusal_under_kl"
    assert summary["proxy_rule"]["name"] == "min_refusal_under_kl"
    assert expected["number"] in summary["verified_front"]
    lowest_kl = min(r["kl"] for r in verified)
    assert (verified[0]["number"] in summary["verified_front"]) == (verified[0]["kl"] == lowest_kl)
    ctx = EditContext.from_run(run)
    best = load_edit(run / "edits" / "search_best")
    rebuilt = build_edit(summary["chosen"]["choice"], ctx)
    assert best.fingerprint() == summary["chosen"]["edit_fingerprint"]
    assert torch.equal(best.per_layer, rebuilt.per_layer) and best.attn_weights == rebuilt.attn_weights
    assert best.mlp_weights == rebuilt.mlp_weights and best.meta["search"]["trial"] == expected["number"]
    assert best.meta["search"]["verified"]["rate"] == summary["chosen"]["verified"]["rate"]
    on_disk = json.loads((run / "search_edits.json").read_text())
    assert on_disk["chosen"]["number"] == expected["number"] and on_disk["verification"]["judge"] == "scripted"
    assert all(v["verified"]["max_new_tokens"] == 64 and v["verified"]["n"] == n_val for v in on_disk["verified"])
    table = format_edit_search(summary)
    assert f"*#{expected['number']}" in table and "verified" in table and "proxy alone would have picked" in table
    assert "verification:" in table and "64 greedy tokens" in table and "scripted judge" in table


def test_a_killed_verification_resumes_without_regenerating_finished_edits(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    log = tmp_path / "work.log"
    args = ["search", "-r", str(run), "--trials", "8", "--n-startup-trials", "2", "--verify", "6"]
    killed = _cli(*args, env={"REFUSAL_ATLAS_TEST_KILL_AFTER": "generate:2"}, check=False)
    assert killed.returncode < 0  # SIGKILL inside the second edit's generation
    first = sorted(p.name for p in (run / "search_verify").rglob("trial_*"))
    assert sum(n.endswith(".json") for n in first) == 1 and sum(n.endswith(".jsonl") for n in first) == 2
    assert not (run / "search_edits.json").exists()
    out = _cli(*args, env={"REFUSAL_ATLAS_TEST_WORK_LOG": str(log)}).stdout
    summary = json.loads((run / "search_edits.json").read_text())
    n_edits = len(summary["verified"])
    assert n_edits >= 3  # the kill was mid-verification
    assert log.read_text().split().count("generate") == n_edits - 2  # the two finished edits were not regenerated
    assert log.read_text().split().count("trial") == 0  # nor any trial
    assert summary["verification"]["reused_edits"] == 1  # the first one's verdicts; the second's completions only
    assert "verification:" in out and "reused" in out
    again = _cli(*args, env={"REFUSAL_ATLAS_TEST_WORK_LOG": str(tmp_path / "again.log")}).stdout
    assert not (tmp_path / "again.log").exists() or "generate" not in (tmp_path / "again.log").read_text()
    assert json.loads((run / "search_edits.json").read_text())["chosen"]["number"] == summary["chosen"]["number"]
    assert f"{n_edits} edits reused" in again


def test_verify_zero_keeps_the_proxy_pick_and_origins_are_shown(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    out = _cli("search", "-r", str(run), "--trials", "8", "--n-startup-trials", "10", "--verify", "0").stdout
    summary = json.loads((run / "search_edits.json").read_text())
    assert "verified" not in summary and "verification" not in summary and not (run / "search_verify").exists()
    assert summary["rule"]["name"] == "min_refusal_under_kl" and "proxy_chosen" not in summary
    front = {t["number"]: t for t in summary["pareto"]}
    ok = [t for t in front.values() if t["kl"] <= summary["rule"]["kl_threshold"]]
    expected = (min(ok, key=lambda t: (t["refusal"], t["kl"], t["number"])) if ok
                else min(front.values(), key=lambda t: (t["kl"], t["refusal"], t["number"])))
    assert summary["chosen"]["number"] == expected["number"]
    assert [t["origin"] for t in summary["trials"]] == ["anchor"] * 6 + ["random"] * 2  # 10 start-up trials
    assert "verification:" not in out and "no trial was proposed by TPE" in out
    assert all(f"#{t['number']}" in out and t["origin"] in out for t in summary["pareto"])
    more = _cli("search", "-r", str(run), "--trials", "12", "--n-startup-trials", "10", "--verify", "0").stdout
    origins = [t["origin"] for t in json.loads((run / "search_edits.json").read_text())["trials"]]
    assert origins == ["anchor"] * 6 + ["random"] * 4 + ["tpe"] * 2 and "no trial was proposed" not in more


@pytest.mark.parametrize("args, match", [(["--verify", "-1"], "search.verify"),
                                         (["--verify-tokens", "0"], "search.verify_tokens"),
                                         (["--judge", "llamaguard"], "search.judge")])
def test_bad_verification_input_is_one_error_line_before_the_model_loads(tiny_run, tmp_path, args, match):
    run = _copy(tiny_run, tmp_path)
    proc = _cli("search", "-r", str(run), *args, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and match in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr
    assert not (run / "study.db").exists() and not (run / "search_verify").exists()
