"""bench/search_fidelity.py's pure parts: tie-aware Spearman ρ, the tie-broken few-token score, the pruning replay."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from refusal_atlas.search.trial import PruneRule

_PATH = Path(__file__).resolve().parents[2] / "bench" / "search_fidelity.py"
_spec = importlib.util.spec_from_file_location("search_fidelity", _PATH)
sf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sf)


def test_spearman_uses_average_ranks_for_ties():
    assert sf.spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(1.5 / math.sqrt(3))  # ranks 1.5, 1.5, 3
    assert sf.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert sf.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(sf.spearman([1, 2, 3], [0, 0, 0]))


def _row(n, values, partial, rate4=0.0):
    return {"number": n, "values": list(values), "partial": list(partial), "few_token_rates": {"4": rate4},
            "n_prompts": 32}


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
