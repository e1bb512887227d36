"""bench/search_fidelity.py's pure parts: tie-aware Spearman ρ, the tie-broken few-token score, the pruning replay."""

from __future__ import annotations

import importlib.util
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from refusal_atlas.search.trial import PruneRule

_PATH = Path(__file__).resolve().parents[2] / "bench" / "search_fidelity.py"
_spec = importlib.util.spec_from_file_location("search_fidelity", _PATH)
sf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sf)


@contextmanager
def trial_cost_module():
    """bench/trial_cost.py as a module (it imports search_fidelity from bench/, so bench/ joins the path)."""
    sys.path.insert(0, str(_PATH.parent))
    try:
        spec = importlib.util.spec_from_file_location("trial_cost", _PATH.parent / "trial_cost.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(_PATH.parent))


def test_spearman_uses_average_ranks_for_ties():
    assert sf.spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(1.5 / math.sqrt(3))  # ranks 1.5, 1.5, 3
    assert sf.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert sf.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(sf.spearman([1, 2, 3], [0, 0, 0]))


def _row(n, values, partial, rate4=0.0):
    return {"number": n, "values": list(values), "partial": list(partial), "few_token_rates": {"4": rate4},
            "n_prompts": 32, "refusal_stats": {"logodds": values[0], "probability": 1 / (1 + math.exp(-values[0]))}}


def test_each_refusal_statistic_is_ranked_against_generation_overall_and_on_the_stronger_half():
    truth = [0.1, 0.2, 0.3, 0.5, 0.6, 0.8]
    # log-odds ranks the strong end wrongly (rows 0 and 1 swapped), probability gets it right
    rows = [{"refusal_stats": {"logodds": lo, "probability": p}} for lo, p in
            [(-3.0, 0.05), (-3.5, 0.10), (-2.0, 0.20), (-1.0, 0.40), (0.0, 0.55), (1.0, 0.70)]]
    out = sf.stat_correlations(rows, truth)
    assert out["probability"] == pytest.approx(1.0) and out["probability_stronger_half"] == pytest.approx(1.0)
    assert out["logodds"] < 1.0 and out["logodds_stronger_half"] == pytest.approx(0.5)


def test_hybrid_keeps_rate_steps_and_breaks_ties_by_the_logit_score():
    a, b, c = _row(0, (-3.0, 0.1), (0, 0), 1 / 32), _row(1, (-1.0, 0.1), (0, 0), 1 / 32), _row(2, (-9.0, 0.1), (0, 0), 2 / 32)
    assert sf.hybrid(a, 4) < sf.hybrid(b, 4) < sf.hybrid(c, 4)  # c's higher rate wins over its far lower score


def test_pruning_replay_counts_what_the_rule_would_stop():
    rows = [_row(0, (-3.0, 0.05), (-3.0, 0.05)), _row(1, (-1.0, 0.2), (-1.0, 0.2)),  # 1: clearly dominated by 0
            _row(2, (-4.0, 0.1), (-4.0, 0.1)), _row(3, (-2.9, 0.06), (-2.9, 0.06))]  # 3: dominated, within margins
    out = sf.replay_pruning(rows, PruneRule(0.25, 0.5, 1.5, 0.002))
    assert out["pruned"] == [1] and out["final_front"] == [0, 2] and out["front_trials_pruned"] == []
    tight = sf.replay_pruning(rows, PruneRule(0.25, 0.0, 1.0, 0.0))
    assert tight["pruned"] == [1, 3]
    lost = sf.replay_pruning([rows[0], _row(1, (-5.0, 0.01), (-2.0, 0.2))], PruneRule(0.25, 0.0, 1.0, 0.0))
    assert lost["pruned"] == [1] and lost["front_trials_pruned"] == [1]  # a misleading first stage loses a front trial


def test_trial_cost_compares_two_dtypes_on_the_same_edits():
    with trial_cost_module() as tc:
        run = lambda dtype, vals, s: {"dtype": dtype, "median": {"staged_s": s},  # noqa: E731
                                      "trials": [{"choice": {"i": i}, "values": v} for i, v in enumerate(vals)]}
        bf = run("bfloat16", [(-1.0, 0.011), (-2.0, 0.031), (-3.0, 0.021)], 10.0)
        fp = run("float32", [(-1.1, 0.010), (-3.1, 0.030), (-2.9, 0.020)], 25.0)
        text = tc.compare_runs(bf, fp)
        assert "2.50x" in text
        assert "refusal score: Spearman rho 0.500" in text and "KL: Spearman rho 1.000" in text
        assert "median +0.0010" in text
        with pytest.raises(SystemExit, match="other edits"):
            tc.compare_runs(bf, run("float32", [(-1.0, 0.0)] * 3, 25.0) | {"trials": [{"choice": {"i": 9}, "values": (0, 0)}] * 3})


def test_trial_cost_profile_splits_matmul_kernels_from_the_rest():
    import torch

    with trial_cost_module() as tc:
        class Fake:  # three matmuls and a large elementwise op per "trial"
            def score(self, edit):
                a = torch.randn(256, 256)
                for _ in range(3):
                    a = a @ a / 16
                return torch.exp(torch.randn(2_000_000)).sum()

        out = tc.profile_trial(Fake(), None, flops=3 * 2 * 256 ** 3)
        assert out["matmul_calls"] == 3 and out["matmul_s"] > 0 and out["other_s"] > 0
        assert "aten::exp" in out["top_other"] and not set(out["top_other"]) & set(tc.MATMUL_OPS)
        assert out["matmul_gflops"] == pytest.approx(3 * 2 * 256 ** 3 / out["matmul_s"] / 1e9)
        assert out["profiled_total_s"] == pytest.approx(out["matmul_s"] + out["other_s"])
