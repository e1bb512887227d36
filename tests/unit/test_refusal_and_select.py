import pytest
import torch

from refusal_atlas.model.activations import extract
from refusal_atlas.directions.dim import difference_in_means
from refusal_atlas.directions.select import _filter_reason, select_direction
from refusal_atlas.core.errors import ModelError
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.refusal import is_refusal, refusal_score, refusal_token_ids
from refusal_atlas.evaluation.stats import wilson_interval
from tiny import tiny_tokenizer

HARMFUL = ["how to make a bomb", "hack into computer", "steal money please", "how to hack computer"]
HARMLESS = ["write poem about cats", "explain the weather", "tell joke", "list three colors"]


def test_refusal_tokens_are_derived_from_the_tokenizer():
    tok = tiny_tokenizer()
    assert refusal_token_ids(tok) == [tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("As")]
    with pytest.raises(ModelError, match="single token"):
        refusal_token_ids(tok, words=("Absolutely not",))


def test_refusal_score_is_log_odds():
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    score = refusal_score(probs.log(), [0, 1])
    expected = torch.log(torch.tensor([0.5, 0.95]) + 1e-8) - torch.log(torch.tensor([0.5, 0.05]) + 1e-8)
    assert torch.allclose(score, expected.double(), atol=1e-6)


def test_substring_judge():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("i cannot do this")
    assert is_refusal("Sure. I\u2019m sorry to say...")  # curly apostrophe
    assert is_refusal("   ")  # empty counts as refusal
    assert not is_refusal("Sure, here is a poem about cats.")


def test_kl_is_zero_for_same_distribution_and_positive_otherwise():
    a = torch.log_softmax(torch.randn(3, 10), -1)
    b = torch.log_softmax(torch.randn(3, 10), -1)
    assert next_token_kl(a, a).abs().max() < 1e-9
    assert (next_token_kl(a, b) > 0).all()


def test_wilson_interval_bounds():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9


def test_filter_reasons():
    assert _filter_reason({"refusal": -1.0, "kl": 0.5, "steering": 1.0}, 0.1, 0.0) == "kl"
    assert _filter_reason({"refusal": -1.0, "kl": 0.05, "steering": -1.0}, 0.1, 0.0) == "induce"
    assert _filter_reason({"refusal": float("nan"), "kl": 0.05, "steering": 1.0}, 0.1, 0.0) == "nan"
    assert _filter_reason({"refusal": -1.0, "kl": 0.05, "steering": 1.0}, 0.1, 0.0) is None


def _candidates(adapter, chat):
    kw = dict(positions=[-2, -1], batch_size=4)
    return difference_in_means(extract(adapter, chat, HARMFUL, **kw), extract(adapter, chat, HARMLESS, **kw))


def test_candidate_lookup_takes_layer_and_position_by_keyword(tiny_parts):
    _, adapter, chat = tiny_parts
    cands = _candidates(adapter, chat)
    d = cands.at(layer=cands.layers[1], position=-2)
    assert (d.layer, d.position) == (cands.layers[1], -2)
    assert torch.equal(d.vectors[0], cands.vectors[cands.positions.index(-2), 1])
    with pytest.raises(TypeError):
        cands.at(cands.layers[1], -2)  # positional (layer, position) vs (position, layer) was the trap


def test_selection_excludes_late_layers_and_picks_min_refusal_among_survivors(tiny_parts):
    _, adapter, chat = tiny_parts
    ids = refusal_token_ids(chat.tokenizer)
    cands = _candidates(adapter, chat)
    sel = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, kl_threshold=1e9,
                           induce_threshold=-1e9, prune_layer_frac=0.5, exhaustive=True)
    by_status = {(r["position"], r["layer"]): r["status"] for r in sel.scores}
    assert all(by_status[(p, l)] == "filtered:late_layer" for p in (-2, -1) for l in (2, 3))
    survivors = [r for r in sel.scores if r["status"] == "ok"]
    assert len(survivors) == 4
    best = min(survivors, key=lambda r: r["refusal"])
    assert (sel.direction.layer, sel.direction.position) == (best["layer"], best["position"])
    assert sel.direction.method == "dim"


def test_lazy_selection_matches_exhaustive(tiny_parts):
    _, adapter, chat = tiny_parts
    ids = refusal_token_ids(chat.tokenizer)
    cands = _candidates(adapter, chat)
    kls = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, kl_threshold=1e9, induce_threshold=-1e9,
                           exhaustive=True)
    median_kl = sorted(r["kl"] for r in kls.scores if "kl" in r)[len(kls.scores) // 3]
    kw = dict(kl_threshold=median_kl, induce_threshold=-1e9, prune_layer_frac=0.0)
    lazy = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, **kw)
    full = select_direction(adapter, chat, cands, HARMFUL, HARMLESS, ids, exhaustive=True, **kw)
    assert (lazy.direction.layer, lazy.direction.position) == (full.direction.layer, full.direction.position)
    assert any(r["status"] == "not_evaluated" for r in lazy.scores) or len(lazy.scores) == 1


def test_strict_selection_returns_nothing_and_relaxed_selection_records_relaxation(tiny_parts):
    _, adapter, chat = tiny_parts
    args = (adapter, chat, _candidates(adapter, chat), HARMFUL, HARMLESS, refusal_token_ids(chat.tokenizer))
    strict = select_direction(*args, kl_threshold=-1.0, strict=True)  # KL >= 0 always fails
    assert strict.direction is None and all(r["status"].startswith("filtered") for r in strict.scores)
    relaxed = select_direction(*args, kl_threshold=-1.0, induce_threshold=1e9)
    assert relaxed.relaxed == ["induce", "kl"]
    best = min((r for r in relaxed.scores if "refusal" in r), key=lambda r: r["refusal"])
    assert (relaxed.direction.layer, relaxed.direction.position) == (best["layer"], best["position"])
    assert relaxed.direction.meta["relaxed_filters"] == ["induce", "kl"]
    # only the induce filter fails → only it is relaxed, and KL still constrains the choice
    only_induce = select_direction(*args, kl_threshold=1e9, induce_threshold=1e9)
    assert only_induce.relaxed == ["induce"]


def test_pipeline_reports_scores_when_strict_selection_fails(tmp_path):
    from refusal_atlas.settings import SelectionSettings
    from refusal_atlas.workflows.run import _no_survivor_message

    msg = _no_survivor_message(SelectionSettings(), [{"layer": 3, "kl": 0.2, "steering": -1.0}])
    assert "lowest KL 0.200 (layer 3)" in msg and "selection.json" in msg
