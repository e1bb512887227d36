"""`reproduce` end to end on a tiny random model: rows (a)–(g) with n, CI and verdict, resume, bad input."""

from __future__ import annotations

import pytest

from refusal_atlas.core.errors import ConfigError, RefusalAtlasError
from refusal_atlas.workflows.reproduce.budget import ReproduceBudget

TINY = dict(name="tiny", harmful_train="harmful_train", harmless_train="harmless_train", n_harmful_train=16,
            n_harmless_train=12, filter_train=False, harmful_val="harmful_val", n_val=4, n_eval=4, n_logit=4,
            n_xstest=3, max_new_tokens=2, batch_size=8, layer=2, som_grid=(3, 3), som_iterations=300, k_max=3,
            subset_trials=2, grad_n_train=4, grad_batch=2, grad_n_val=2, target_tokens=2, rdo_steps=2, cone_k_max=2, cone_steps=2,
            cone_samples=2, n_random=2, repind_steps=2, edit_trials=2, strength_grid=(0.5, 1.0), strength_refine=1)
TINY_GRID = TINY["strength_grid"]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    from refusal_atlas.core.runtime import configure, restore
    from refusal_atlas.workflows.reproduce.job import run_reproduce

    run_dir = tmp_path_factory.mktemp("repro") / "R"
    log = run_dir.parent / "work.log"
    previous = configure(work_log=str(log))  # what REFUSAL_ATLAS_TEST_WORK_LOG does for the CLI, for this module
    data = run_reproduce(run_dir, ReproduceBudget(**TINY), str(tiny_model_dir), device="cpu")
    yield run_dir, data, log
    restore(previous)


def test_every_row_has_n_ci_and_a_verdict_by_a_stated_rule(finished):
    run_dir, data, _ = finished
    assert sorted(data["rows"]) == list("abcdefg")
    for rid, row in data["rows"].items():
        assert row["n"], rid
        assert row["verdict"]["verdict"] in ("supported", "not supported", "inconclusive"), rid
        assert row["verdict"]["rule"], rid
        assert row["prompts"] and row["measured"], rid
        cis = [c.get("ci95") for c in row["numbers"].values() if isinstance(c, dict)]
        if rid != "a":  # (a) is exact arithmetic; every other row carries 95% intervals
            assert any(ci is not None and ci[0] <= ci[1] for ci in cis), rid
    md = (run_dir / "reproduce.md").read_text()
    for rid in "abcdefg":
        assert f"| ({rid}) " in md
    assert (run_dir / "reproduce.json").is_file()
    for rid in "bdef":
        assert (run_dir / data["plots"][rid]).is_file()


def test_row_a_one_neuron_som_equals_dim(finished):
    a = finished[1]["rows"]["a"]
    assert a["numbers"]["relative_error_inverse_schedule"]["value"] < 1e-5
    assert a["verdict"]["verdict"] == "supported"
    # the paper's schedule is not the running mean: a real contrast, not a tautology
    assert a["numbers"]["relative_error_paper_schedule"]["value"] > 1e-3


def test_row_b_curve_covers_k_and_picks_on_validation(finished):
    b = finished[1]["rows"]["b"]
    for mode in ("sequential", "subspace"):
        assert [c["k"] for c in b["curves"][mode]] == [1, 2, 3]
        assert b["numbers"][f"som_{mode}_best"]["k"] in (1, 2, 3)
    assert b["som"]["n_samples"] == 16


def test_rows_b_and_g_compare_at_matched_kl_with_caveats_and_training_curves(finished):
    from refusal_atlas.workflows.reproduce.matched_kl import choose_matched
    from refusal_atlas.workflows.reproduce.shared import ROWS_USING_DIM

    run_dir, data, _ = finished
    rows = data["rows"]
    matched = {**rows["b"]["matched"], **rows["g"]["matched"]}
    assert set(matched) == {"dim", "som_sequential", "som_subspace", "search"}
    for name, m in matched.items():
        strengths = [p["strength"] for p in m["sweep"]]
        assert strengths == sorted(strengths) and set(TINY_GRID) <= set(strengths), name
        assert m["strength"] == choose_matched(m["sweep"], m["target_kl"])["strength"], name  # the rule, on validation
        assert m["heldout_refusal"]["n"] == rows["b"]["n"] == 4 and m["heldout_kl"]["ci95"], name
    assert rows["g"]["numbers"]["dim_refusal"] == rows["b"]["numbers"]["dim_refusal"]  # one matched DIM for both
    for rid in ROWS_USING_DIM:
        assert isinstance(rows[rid]["caveats"], list), rid
    assert any("target validation KL" in c for c in rows["b"]["caveats"])  # tiny edits never reach KL 0.1
    curves = {**rows["c"]["training"], **rows["d"]["training"], **rows["e"]["training"]}
    assert set(curves) == {"rdo", "cone_k2", "repind", "rdo_orth"}
    for name, c in curves.items():
        assert c["steps_run"] == len(c["loss"]) == 2 and c["validation"][0]["step"] == 0, name
    assert 0 <= curves["rdo"]["cos_with_init"] <= 1
    for key in ("b_matched", "g", "training"):
        assert (run_dir / data["plots"][key]).is_file(), key
    md = (run_dir / "reproduce.md").read_text()
    assert "## Training of the gradient methods" in md and "| rdo | 2 |" in md


def test_rerun_skips_finished_rows_and_redoes_a_missing_one(finished, tiny_model_dir):
    from refusal_atlas.workflows.reproduce.job import row_path, run_reproduce

    run_dir, data, log = finished
    assert log.read_text().count("row\n") == 7
    log.write_text("")
    again = run_reproduce(run_dir, ReproduceBudget(**TINY), str(tiny_model_dir), device="cpu")
    assert log.read_text() == ""  # nothing recomputed, no model loaded
    assert again["rows"]["c"]["numbers"] == data["rows"]["c"]["numbers"]
    row_path(run_dir, "d").unlink()
    again = run_reproduce(run_dir, ReproduceBudget(**TINY), str(tiny_model_dir), device="cpu")
    assert log.read_text().split() == ["row"]  # only (d), and its cone training was reused
    assert again["rows"]["d"]["numbers"]["random_scores"] == data["rows"]["d"]["numbers"]["random_scores"]


def test_changed_budget_is_refused_before_any_model_loads(finished, tiny_model_dir):
    from refusal_atlas.workflows.reproduce.job import check_reproduce_dir

    run_dir = finished[0]
    with pytest.raises(ConfigError, match="n_eval"):
        check_reproduce_dir(run_dir, ReproduceBudget(**{**TINY, "n_eval": 5}), str(tiny_model_dir))


def test_bad_input_cli(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "REFUSAL_ATLAS_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    for args, text in ((["--budget", "huge", "-r", "x"], "unknown --budget"),
                       (["--model", "./no/such/model", "-r", "y"], "not found")):
        proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "reproduce", *args], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=120)
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error:") and text in lines[0], proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_prints_each_rows_caveats_under_its_verdict(monkeypatch, capsys, tmp_path):
    from refusal_atlas.cli.reproduce import reproduce
    from refusal_atlas.workflows.reproduce import job

    rows = {"b": {"claim": "SOM-k beats DIM", "verdict": {"verdict": "inconclusive"},
                  "caveats": ["DIM selection relaxed its KL filter: layer 18"]},
            "c": {"claim": "RDO damages less", "verdict": {"verdict": "supported"}, "caveats": []}}
    monkeypatch.setattr(job, "run_reproduce", lambda *a, **k: {"rows": rows})
    reproduce(run_dir=tmp_path / "R")
    out = capsys.readouterr().out.splitlines()
    b_line = next(i for i, line in enumerate(out) if line.startswith("(b) inconclusive"))
    assert out[b_line + 1] == "    caveat: DIM selection relaxed its KL filter: layer 18"
    assert out[b_line + 2].startswith("(c) supported") and sum("caveat:" in line for line in out) == 1


def test_budget_checks():
    with pytest.raises(RefusalAtlasError, match="k_max"):
        ReproduceBudget(k_max=8)


def test_pick_k_uses_validation_numbers_only():
    from refusal_atlas.workflows.reproduce.som_subsets import pick_k

    curve = [{"k": 1, "val_refusal": -1.0, "val_kl": 0.05, "heldout_score": {"mean": -9.0}},
             {"k": 2, "val_refusal": -3.0, "val_kl": 0.08, "heldout_score": {"mean": 5.0}},
             {"k": 3, "val_refusal": -8.0, "val_kl": 0.30, "heldout_score": {"mean": -20.0}}]
    assert pick_k(curve, 0.1)["k"] == 2  # lowest validation refusal under the KL bound; held-out never looked at
    assert pick_k(curve, 0.01)["k"] == 1  # nothing under the bound: the lowest validation KL


# --- matched KL (rows (b), (g)) ------------------------------------------------------------------------
def _rate(count: int, n: int = 300) -> dict:
    from refusal_atlas.evaluation.stats import rate_record

    return rate_record(count, n)


def _kl(mean: float, half: float = 0.01) -> dict:
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": 300}


# (strength, validation KL, held-out refusal count of 300): what each strength would give if measured
DIM_POINTS = [(0.25, 0.01, 120), (0.5, 0.04, 60), (0.75, 0.09, 30), (1.0, 0.30, 3), (1.25, 0.55, 1)]
SOM_POINTS = [(0.25, 0.02, 110), (0.5, 0.06, 40), (0.75, 0.11, 12), (1.0, 0.25, 2), (1.25, 0.40, 1)]


def _summary(name, table, target):
    from refusal_atlas.workflows.reproduce.matched_kl import choose_matched, matched_summary

    points = [{"strength": s, "val_kl": kl} for s, kl, _ in table]
    chosen = choose_matched(points, target)
    count = {s: c for s, _, c in table}[chosen["strength"]]  # held-out is measured at the chosen strength only
    return matched_summary(name, points, target, _rate(count), _kl(chosen["val_kl"]))


def test_matched_kl_picks_each_strength_by_validation_kl_and_compares_there():
    from refusal_atlas.workflows.reproduce.matched_kl import compare_matched

    dim, som = _summary("DIM", DIM_POINTS, 0.1), _summary("SOM-k", SOM_POINTS, 0.1)
    assert (dim["strength"], som["strength"]) == (0.75, 0.75)  # val KL 0.09 and 0.11: closest to 0.1
    # at matched KL SOM-k refuses 12/300 vs DIM 30/300: the intervals separate → supported. At full strength
    # (1.0) the comparison would have been 2/300 vs 3/300 (inconclusive) at KL 0.25 vs 0.30: not what is asked.
    v = compare_matched(som, dim, "refusal SOM-k vs DIM")
    assert v.verdict == "supported" and "s=0.75" in v.detail
    assert compare_matched(dim, som, "refusal DIM vs SOM-k").verdict == "not supported"
    # a lower target moves both choices down the grid, where DIM refuses less
    low_dim, low_som = _summary("DIM", DIM_POINTS, 0.03), _summary("SOM-k", SOM_POINTS, 0.03)
    assert (low_dim["strength"], low_som["strength"]) == (0.5, 0.25)
    assert compare_matched(low_som, low_dim, "refusal").verdict == "not supported"  # 110 vs 60 refusals


def test_matched_verdict_is_inconclusive_only_when_the_intervals_overlap():
    """At n = 300 the Wilson intervals of 12 and 30 refusals separate (a verdict), those of 25 and 30 overlap
    (inconclusive); the verdict reads only the refusal intervals at the matched strengths."""
    from refusal_atlas.workflows.reproduce.matched_kl import compare_matched, matched_summary

    def method(name: str, count: int) -> dict:
        return matched_summary(name, [{"strength": 0.75, "val_kl": 0.1}], 0.1, _rate(count), _kl(0.1))

    for a, b, verdict in ((12, 30, "supported"), (30, 12, "not supported"), (25, 30, "inconclusive"),
                          (30, 25, "inconclusive"), (30, 30, "inconclusive")):
        ra, rb = _rate(a), _rate(b)
        overlap = ra["ci95"][0] <= rb["ci95"][1] and rb["ci95"][0] <= ra["ci95"][1]
        v = compare_matched(method("A", a), method("B", b), "refusal")
        assert v.verdict == verdict and (v.verdict == "inconclusive") == overlap, (a, b)
        assert "at matched validation KL" in v.detail
    # the same pair at n = 50 (quick's n) overlaps: the small n, not the methods, makes it inconclusive
    small = [matched_summary(x, [{"strength": 1.0, "val_kl": 0.1}], 0.1, _rate(c * 50 // 300, 50), _kl(0.1))
             for x, c in (("A", 12), ("B", 30))]
    assert compare_matched(*small, "refusal").verdict == "inconclusive"


def test_matched_kl_ties_take_the_lower_kl_and_refining_interpolates_inside_the_bracket():
    from refusal_atlas.workflows.reproduce.matched_kl import choose_matched, next_strength, reached

    points = [{"strength": 0.5, "val_kl": 0.08}, {"strength": 1.0, "val_kl": 0.12}, {"strength": 1.5, "val_kl": 0.5}]
    assert choose_matched(points, 0.1)["strength"] == 0.5  # |0.08−0.1| == |0.12−0.1|: the less damaging one
    assert next_strength(points, 0.1) == pytest.approx(0.75)  # KL linear in s between 0.5 and 1.0 reaches 0.1 midway
    assert next_strength(points, 0.11) == pytest.approx(0.875)  # three quarters of the way from 0.08 to 0.12
    assert next_strength(points, 0.2) == pytest.approx(1.125)  # 0.12 → 0.5 brackets 0.2: clamped a quarter in
    assert next_strength(points, 0.9) is None and not reached(points, 0.9)
    assert next_strength(points, 0.01) is None and not reached(points, 0.01)
    assert reached(points, 0.1)
    # a non-monotone sweep: the first (least damaging) bracket is refined
    bumpy = [{"strength": 0.5, "val_kl": 0.05}, {"strength": 1.0, "val_kl": 0.15}, {"strength": 1.5, "val_kl": 0.05}]
    assert next_strength(bumpy, 0.1) == pytest.approx(0.75)


def test_refining_converges_on_the_strength_of_the_target_kl():
    """Refining a made-up convex KL(s) = 0.2·s³ from the grid lands within a few percent of the s where KL is
    the target, and the matched strength is the evaluated one nearest in KL."""
    from refusal_atlas.workflows.reproduce.matched_kl import choose_matched, next_strength

    def kl(s: float) -> float:
        return 0.2 * s ** 3

    points = [{"strength": s, "val_kl": kl(s)} for s in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)]
    for _ in range(6):
        points.append({"strength": (s := next_strength(points, 0.1)), "val_kl": kl(s)})
    best = choose_matched(points, 0.1)
    assert best["strength"] == pytest.approx(0.5 ** (1 / 3), rel=0.02)  # KL(s) = 0.1 at s = 0.794
    assert abs(best["val_kl"] - 0.1) < 0.005


def test_matching_caveats_say_when_the_match_did_not_hold():
    from refusal_atlas.workflows.reproduce.matched_kl import matched_summary, matching_caveats

    weak = matched_summary("searched edit", [{"strength": 1.0, "val_kl": 0.01}, {"strength": 1.5, "val_kl": 0.03}],
                           0.1, _rate(50), _kl(0.02, 0.005))
    dim = _summary("DIM", DIM_POINTS, 0.1)
    text = " ".join(matching_caveats([weak, dim]))
    assert "searched edit stays below the target" in text and "compared at strength 1.5" in text
    assert "held-out KL not matched" in text  # 0.02 [0.015, 0.025] vs 0.09 [0.08, 0.10]
    som = _summary("SOM-k", SOM_POINTS, 0.1)  # both sweeps cross 0.1
    som["heldout_kl"] = _kl(0.13)  # held-out 0.09 ± 0.01 vs 0.13 ± 0.01: the validation match did not carry over
    assert len(matching_caveats([dim, som])) == 1 and "held-out KL not matched" in matching_caveats([dim, som])[0]
    som["heldout_kl"] = _kl(0.095)
    assert matching_caveats([dim, som]) == []
    # crossed, but the nearest evaluated strength is still 40% off the target: said, with the numbers
    coarse = matched_summary("SOM-k", [{"strength": 0.5, "val_kl": 0.06}, {"strength": 1.0, "val_kl": 0.2}], 0.1,
                             _rate(10), _kl(0.095))
    text = matching_caveats([coarse])
    assert len(text) == 1 and "matched strength 0.5 has validation KL 0.06, 40% from the target 0.1" in text[0]


def test_scaled_edit_multiplies_every_weight():
    import torch

    from refusal_atlas.edits import DirectionalAblation, LayerwiseAblation
    from refusal_atlas.workflows.reproduce.matched_kl import scaled

    d = torch.nn.functional.normalize(torch.randn(4, 1, 32), dim=-1)
    edit = LayerwiseAblation(d, [1.0, 0.8, 0.6, 0.4], [0.5] * 4, mode="sequential", embed_weight=1.0, name="e")
    half = scaled(edit, 0.5)
    assert half.attn_weights == [0.5, 0.4, 0.3, 0.2] and half.mlp_weights == [0.25] * 4
    assert half.embed_weight == 0.5 and half.mode == "sequential" and torch.equal(half.per_layer, edit.per_layer)
    assert half.label != edit.label  # its completions are never mistaken for the unscaled edit's
    with pytest.raises(RefusalAtlasError, match="per-layer"):
        scaled(DirectionalAblation.from_directions(d[0]), 0.5)


# --- the selection caveat ------------------------------------------------------------------------------
def _selection(relaxed, kl, layer=18):
    return {"chosen": {"layer": layer, "position": -1}, "relaxed_filters": relaxed,
            "candidates": [{"layer": 16, "position": -1, "kl": 0.06}, {"layer": layer, "position": -1, "kl": kl}]}


def test_selection_caveat_when_the_kl_filter_was_relaxed_or_far_exceeded():
    from refusal_atlas.workflows.reproduce.shared import selection_caveats

    relaxed = selection_caveats(_selection(["induce", "kl"], 0.47), 0.1)
    assert any("relaxed its KL filter" in c and "0.47" in c and "4.7x" in c and "layer 18" in c for c in relaxed)
    assert any("induce" in c for c in relaxed)
    assert selection_caveats(_selection([], 0.25), 0.1)[0].startswith("the DIM direction (layer 18) has validation KL")
    assert selection_caveats(_selection([], 0.15), 0.1) == []  # within 2x the bound, nothing relaxed: no caveat
    assert selection_caveats(None, 0.1, measured_kl=0.3)[0].startswith("the DIM direction (the fixed layer)")
    assert selection_caveats(None, 0.1, measured_kl=0.05) == []
    assert "matched-KL strength" in relaxed[0]  # says which rows compare DIM at that damage and which do not
    unknown = selection_caveats({"chosen": {"layer": 3, "position": -1}, "relaxed_filters": ["kl"]}, 0.1)
    assert len(unknown) == 1 and "layer 3 was chosen at an unrecorded validation KL" in unknown[0]


def test_a_pick_several_times_over_the_bound_is_said():
    from refusal_atlas.workflows.reproduce.shared import CAVEAT_KL_FACTOR, over_bound_caveat

    text = over_bound_caveat("the searched edit", 0.47, 0.1)
    assert len(text) == 1 and "0.47, 4.7x the bound 0.1" in text[0] and "matched-KL strength" in text[0]
    assert over_bound_caveat("x", CAVEAT_KL_FACTOR * 0.1, 0.1) == []  # at the factor: not yet "several times"
    assert over_bound_caveat("x", 0.05, 0.1) == [] and over_bound_caveat("x", None, 0.1) == []


def test_rows_using_dim_carry_the_caveats_in_json_and_table():
    from refusal_atlas.evaluation.verdicts import ClaimVerdict
    from refusal_atlas.report.reproduce import to_markdown
    from refusal_atlas.workflows.reproduce.shared import row

    r = row("c", "m", "p", 3, {"x": {"rate": 0.1, "ci95": [0.0, 0.2], "n": 3}},
            ClaimVerdict("inconclusive", "rule", "detail"), ["DIM selection relaxed its KL filter: ..."])
    assert r["caveats"] == ["DIM selection relaxed its KL filter: ..."]
    md = to_markdown({"name": "t"}, {"c": r}, {})
    assert "⚠ caveat: DIM selection relaxed its KL filter" in md


# --- the held-out pool and the standard budget ---------------------------------------------------------
def test_held_out_pool_dedupes_excludes_and_fills_in_order():
    from refusal_atlas.core.errors import DataError
    from refusal_atlas.data import load_prompts
    from refusal_atlas.workflows.reproduce.budget import HELD_OUT_HARMFUL
    from refusal_atlas.workflows.reproduce.shared import held_out_pool

    jbb = load_prompts("jailbreakbench")
    pool = held_out_pool(HELD_OUT_HARMFUL, 300, 0, exclude=jbb[:5])
    assert list(pool) == list(HELD_OUT_HARMFUL)
    assert [len(v) for v in held_out_pool(HELD_OUT_HARMFUL, 300, 0).values()] == [100, 152, 48]  # docs/reproduce.md
    assert [len(v) for v in pool.values()] == [95, 152, 53]  # 7 HarmBench prompts repeat JBB ones, 3 StrongREJECT
    texts = [" ".join(p.instruction.lower().split()) for v in pool.values() for p in v]
    assert len(texts) == len(set(texts)) == 300
    assert not {" ".join(p.instruction.lower().split()) for p in jbb[:5]} & set(texts)
    assert held_out_pool(HELD_OUT_HARMFUL, 300, 0) == held_out_pool(HELD_OUT_HARMFUL, 300, 0)  # seeded
    with pytest.raises(DataError, match="hold only 100"):
        held_out_pool(("jailbreakbench",), 101, 0)


def test_pooled_rate_counts_every_set():
    from refusal_atlas.workflows.reproduce.shared import pooled_rate

    recs = [{"dataset": "a", "count": 10, "n": 100, "rate": 0.1, "ci95": [0.05, 0.17], "metric": "m",
             "intervention": "x", "max_new_tokens": 64},
            {"dataset": "b", "count": 50, "n": 200, "rate": 0.25, "ci95": [0.2, 0.3], "metric": "m",
             "intervention": "x", "max_new_tokens": 64}]
    p = pooled_rate(recs)
    assert (p["n"], p["count"], p["rate"], p["dataset"]) == (300, 60, 0.2, "a+b")
    assert p["ci95"][0] < 0.2 < p["ci95"][1] and set(p["per_set"]) == {"a", "b"}


def test_standard_budget_is_sized_to_decide():
    from refusal_atlas.workflows.reproduce.budget import FULL, QUICK, STANDARD, budget_named

    assert budget_named("standard") is STANDARD
    assert STANDARD.n_eval >= 300 and STANDARD.eval_harmful == ("jailbreakbench", "harmbench_test", "strongreject")
    assert min(QUICK.max_new_tokens, STANDARD.max_new_tokens, FULL.max_new_tokens) >= 64
    assert (STANDARD.rdo_steps, STANDARD.cone_steps, STANDARD.repind_steps) == (24, 16, 20)
    assert STANDARD.grad_batch == 8 and STANDARD.n_val == 64 and STANDARD.strength_refine == 4
    assert QUICK.n_eval == 50 and QUICK.eval_harmful == ("jailbreakbench",)  # quick keeps its n
    with pytest.raises(RefusalAtlasError, match="standard"):
        budget_named("nope")
    with pytest.raises(RefusalAtlasError, match="strength_grid"):
        ReproduceBudget(strength_grid=(1.0, 0.5))
    with pytest.raises(RefusalAtlasError, match="n_logit"):
        ReproduceBudget(n_logit=60, n_eval=50)


def test_strength_family_builds_every_grid_strength_of_the_standard_budget(finished):
    """The standard grid (0.25 … 1.5) on the tiny run: DIM and a SOM subset at each strength are per-layer edits
    whose largest write weight is the strength (the tiny job itself sweeps only 0.5 and 1.0)."""
    from types import SimpleNamespace

    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.workflows.reproduce.budget import STANDARD
    from refusal_atlas.workflows.reproduce.matched_kl import StrengthFamily

    run_dir, data, _ = finished
    dim = DirectionSet.load(run_dir / "directions" / "dim.safetensors")
    ctx = SimpleNamespace(ws=SimpleNamespace(run=SimpleNamespace(path=run_dir)), dim=dim)
    family = StrengthFamily(ctx, ["som"])
    ids = data["rows"]["b"]["numbers"]["som_sequential_best"]["ids"]
    labels = set()
    for s in STANDARD.strength_grid:
        for edit in (family.dim(s), family.subset("som", ids, "sequential", s)):
            weights = [*edit.attn_weights, *edit.mlp_weights]
            assert max(weights) == pytest.approx(s) and min(weights) >= 0, (s, edit.name)
            labels.add(edit.label)
    assert len(labels) == 2 * len(STANDARD.strength_grid)  # every strength's completions are kept apart


def test_scaled_edit_keeps_transform_means_and_router():
    """A strength sweep of a biprojected (or Householder, or router-suppressing) edit must stay that edit: an
    earlier scaled() rebuilt only the fields it knew and silently turned it into a plain projection."""
    import torch

    from refusal_atlas.edits import LayerwiseAblation
    from refusal_atlas.workflows.reproduce.matched_kl import scaled

    d = torch.nn.functional.normalize(torch.randn(4, 1, 32), dim=-1)
    means = torch.randn(4, 32)
    edit = LayerwiseAblation(d, [1.0] * 4, [0.5] * 4, norm_preserving=True, transform="biproject",
                             harmless_means=means, router_weight=0.8, name="e")
    half = scaled(edit, 0.5)
    assert half.transform == "biproject" and torch.equal(half.harmless_means, means) and half.norm_preserving
    assert half.router_weight == pytest.approx(0.4) and half.mlp_weights == [0.25] * 4
    assert scaled(LayerwiseAblation(d, [1.0] * 4, [1.0] * 4, transform="householder"), 0.3).transform == "householder"
    assert scaled(edit, 1.0).spec()["transform"] == edit.spec()["transform"]
