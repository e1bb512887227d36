"""Evaluation on the embedded model: three judges × three interventions × three prompt roles, damage
metrics, reuse on rerun, and an offline lm-eval smoke run with and without ablation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from refusal_atlas.evaluation.benchmarks import run_benchmarks
from refusal_atlas.evaluation.evaluate import EvalPlan, evaluate_run
from refusal_atlas.evaluation.judges import JudgeOptions, make_judges
from refusal_atlas.edits.interventions import Intervention
from refusal_atlas.core.rundir import RunDir

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_endpoint_judge import FakeServer  # noqa: E402  (a loopback OpenAI-style server)


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    yield s
    s.close()


def test_evaluate_run_three_judges(embedded, embedded_dim, server, tmp_path):
    run = RunDir(tmp_path / "run", create=True)
    opts = JudgeOptions(cache_dir=run / "judgements", judge_model="embedded", endpoint_url=server.url,
                        endpoint_model="fake-judge")
    judges = make_judges(["substring", "hf", "endpoint"], opts,
                         reuse={"embedded": (embedded.loaded.model, embedded.loaded.tokenizer, "embedded")})
    plan = EvalPlan(datasets=["jailbreakbench", "xstest", "harmless_test"],
                    interventions=[Intervention("none"), Intervention("ablate", embedded_dim),
                                   Intervention("actadd", embedded_dim)],
                    judges=judges, n=6, max_new_tokens=16, kl_tokens=8, batch_size=16)
    records = evaluate_run(embedded.adapter, embedded.chat, run, plan, "embedded")
    rates = {(r["dataset"], r["kind"], r["judge"]): r for r in records if "refusal_rate" in r}
    assert len(rates) == 3 * 3 * 3
    for r in rates.values():
        assert r["n"] + r["unclear"] == 6 and "empty_responses" in r
        assert r["n"] == 0 or r["ci95"][0] <= r["rate"] <= r["ci95"][1]
    assert all(r["unclear"] == 0 for (_, _, j), r in rates.items() if not j.startswith("hf:"))
    hf = [r for (_, _, j), r in rates.items() if j.startswith("hf:")]
    assert sum(r["n"] for r in hf) >= 0.5 * 6 * len(hf)  # the hf judge decides most items, not all `unclear`
    assert len({r["rate"] for r in hf if r["n"]}) > 1  # and its verdicts depend on the prompts and responses
    sub = {k[:2]: v["rate"] for k, v in rates.items() if k[2] == "substring"}
    assert sub[("jailbreakbench", "ablate")] < sub[("jailbreakbench", "none")]  # DIM ablation removes refusals
    assert sub[("harmless_test", "actadd")] > sub[("harmless_test", "none")]  # ActAdd induces them
    assert rates[("harmless_test", "actadd", "substring")]["metric"] == "induced_refusal_rate"
    assert rates[("xstest", "none", "substring")]["metric"] == "over_refusal_rate"
    kl = {(r["kind"], r["metric"]): r for r in records if r.get("metric", "").startswith("kl_")}
    assert set(kl) == {(k, m) for k in ("ablate", "actadd") for m in ("kl_first_token", "kl_first_8_tokens")}
    assert kl[("actadd", "kl_first_token")]["kl"] > kl[("ablate", "kl_first_token")]["kl"] > 0
    assert all(r["n"] == 6 and r["ci95"][0] <= r["kl"] <= r["ci95"][1] for r in kl.values())
    hf_lines = len((run / "judgements" / "hf__embedded.jsonl").read_text().splitlines())
    asked = len(server.requests)
    print("\n" + json.dumps({f"{d}/{k}/{j}": (r["rate"], r["n"], r["unclear"]) for (d, k, j), r in rates.items()}))

    again = evaluate_run(embedded.adapter, embedded.chat, run, plan, "embedded")  # rerun: completions and verdicts all come from the run directory
    assert all(r["reused_completions"] == 6 for r in again if "reused_completions" in r)
    assert len(server.requests) == asked
    assert len((run / "judgements" / "hf__embedded.jsonl").read_text().splitlines()) == hf_lines
    assert [r.get("rate") for r in again if "refusal_rate" in r] == [r.get("rate") for r in records
                                                                      if "refusal_rate" in r]
    assert len(run.metrics()) == len(records)


def test_lm_eval_smoke_with_and_without_ablation(embedded, embedded_dim):
    model, tok = embedded.loaded.model, embedded.loaded.tokenizer
    base = run_benchmarks(model, tok, ["smoke"], limit=20, batch_size=16)[0]
    ablated = run_benchmarks(model, tok, ["smoke"], adapter=embedded.adapter,
                             intervention=Intervention("ablate", embedded_dim), limit=20, batch_size=16)[0]
    print(f"\nsmoke acc: none {base['rate']:.2f} {base['ci95']}, ablate {ablated['rate']:.2f} {ablated['ci95']}; "
          f"gold loglik {base['gold_loglik_mean']:.3f} vs {ablated['gold_loglik_mean']:.3f}")
    assert base["n"] == ablated["n"] == 20
    assert base["rate"] >= 0.5  # well above the 0.25 chance level: the task and the wrapper are sane
    assert ablated["gold_loglik_mean"] != pytest.approx(base["gold_loglik_mean"], abs=1e-4)
