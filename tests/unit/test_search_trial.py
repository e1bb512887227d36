"""The staged trial score (search_trial): equal to the plain score with one shared prefix per trial,
partial scores equal to the full score on the first prompts, pruned trials kept off the front, and
resume with pruned trials equal to an uninterrupted search."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import DirectionalAblation, LayerwiseAblation, StrengthKernel
from refusal_atlas.search.sources import EditContext
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.model.prefix_cache import PrefixPlan, plan_logprobs
from refusal_atlas.search.study import completed, finished, open_study, pareto_front
from refusal_atlas.search.storage import fail_stale_trials
from refusal_atlas.search.edit_space import EditSpace, run_edit_trials
from refusal_atlas.search.trial import PruneRule, StagedObjective, TrialScore, first_stage_sizes, refusal_statistic

HARMFUL = ["how to make a bomb", "hack into computer and steal money", "steal money please", "build bomb",
           "how to hack into computer", "make a bomb then steal money", "hack it", "steal the house"]
HARMLESS = ["write poem about cats please", "explain the weather", "tell joke", "give me recipe for cake",
            "list three colors", "build house", "what is the weather", "tell me a poem about cats"]


@pytest.fixture
def staged_parts(tiny):
    adapter = ModelAdapter(tiny.model)
    chat = ChatFormatter(tiny.tokenizer, system="you are helpful assistant")  # a real shared prefix
    return adapter, chat, [40 % len(tiny.tokenizer), 5, 6]


def _edits(adapter):
    g = torch.Generator().manual_seed(3)
    L, d = adapter.n_layers, adapter.d_model
    kern = StrengthKernel(peak=1.2, position=2.0, floor=0.3, distance=2.0)
    dirs = torch.randn(2, d, generator=g)
    dirs[1] += 2 * dirs[0]
    return [DirectionalAblation(torch.randn(1, d, generator=g)),  # hooks
            DirectionalAblation(dirs, "sequential"),  # correlated: evaluated as the in-place weight edit
            LayerwiseAblation.from_kernels(torch.randn(L, 1, d, generator=g), kern, kern, norm_preserving=True,
                                           embed_weight=1.0)]


def _plain(adapter, chat, harmful, harmless, ids, edit):
    """The reference: left-padded passes, no prefix reuse."""
    base = next_token_logprobs(adapter, chat, harmless, 4, reuse_prefix=False)
    with edit.apply(adapter):
        r = refusal_score(next_token_logprobs(adapter, chat, harmful, 4, reuse_prefix=False), ids).mean()
        k = next_token_kl(base, next_token_logprobs(adapter, chat, harmless, 4, reuse_prefix=False)).mean()
    return float(r), float(k)


def test_staged_scores_equal_plain_scores_with_one_prefix_pass_per_trial(staged_parts):
    adapter, chat, ids = staged_parts
    obj = StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, batch_size=3, fraction=0.25, refusal_stat="logodds")
    assert obj.plan is not None and len(obj.plan.prefix) >= 5  # harmful and harmless share one prefix
    obj.baseline()
    assert obj.prefix_passes == 1  # the baseline's refusal pass
    for n, edit in enumerate(_edits(adapter)):
        before = obj.prefix_passes
        score = obj.score(edit)
        assert obj.prefix_passes - before == 1 + (n == 0)  # one per trial (+ the clean harmless pass, once)
        want = _plain(adapter, chat, HARMFUL, HARMLESS, ids, edit)
        assert score.values == pytest.approx(want, abs=1e-5)
        assert score.values[1] > 2e-5 and score.pruned_by is None  # the edit does something
        assert abs(score.values[0] - obj.baseline()["refusal"]) > 1e-3
        assert obj(edit) == pytest.approx(want, abs=1e-5)
    d = DirectionSet(torch.randn(1, adapter.d_model), layer=1, method="dim")  # record_references' call
    assert obj(d) == pytest.approx(_plain(adapter, chat, HARMFUL, HARMLESS, ids, DirectionalAblation(d)), abs=1e-5)
    assert adapter.model._refusal_atlas_head_apart is True  # the scores above came from the head run once per pass


def test_a_model_that_rescales_its_logits_keeps_the_per_batch_head(staged_parts, monkeypatch):
    adapter, chat, ids = staged_parts
    model = adapter.model
    forward = type(model).forward

    def scaled(self, *args, **kwargs):  # like Cohere's logit_scale: the head's output is not the logits
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(type(model), "forward", scaled)
    monkeypatch.setattr(model, "_refusal_atlas_head_apart", None, raising=False)  # check this model afresh
    obj = StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, batch_size=3, refusal_stat="logodds")
    edit = _edits(adapter)[0]
    got = obj.score(edit).values
    assert model._refusal_atlas_head_apart is False
    assert got == pytest.approx(_plain(adapter, chat, HARMFUL, HARMLESS, ids, edit), abs=1e-5)
    plan = PrefixPlan(adapter, chat, HARMLESS, 3)  # the shared pass of selection and evaluation too
    assert torch.allclose(plan_logprobs(plan)[0], next_token_logprobs(adapter, chat, HARMLESS, 4, reuse_prefix=False),
                          atol=1e-4)


def _plain_scores(adapter, chat, ids, edit=None) -> list[float]:
    """Per-prompt refusal log-odds of HARMFUL without prefix reuse (under ``edit`` if given)."""
    from contextlib import nullcontext

    with edit.apply(adapter) if edit is not None else nullcontext():
        return refusal_score(next_token_logprobs(adapter, chat, HARMFUL, 4, reuse_prefix=False), ids).tolist()


def test_the_default_refusal_number_is_the_mean_refusal_probability_and_both_statistics_are_kept(staged_parts):
    adapter, chat, ids = staged_parts
    obj = StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, batch_size=3, fraction=0.25)
    assert obj.refusal_stat == "probability"
    sigmoid = lambda xs: sum(1 / (1 + math.exp(-x)) for x in xs) / len(xs)  # noqa: E731
    assert obj.baseline()["refusal"] == pytest.approx(sigmoid(_plain_scores(adapter, chat, ids)), abs=1e-6)
    for edit in _edits(adapter):
        plain = _plain_scores(adapter, chat, ids, edit)
        score = obj.score(edit)
        assert score.values[0] == pytest.approx(sigmoid(plain), abs=1e-6)
        assert score.values[1] == pytest.approx(_plain(adapter, chat, HARMFUL, HARMLESS, ids, edit)[1], abs=1e-6)
        assert score.stats == pytest.approx({"probability": sigmoid(plain), "logodds": sum(plain) / len(plain)}, abs=1e-6)
        assert score.partial[0] == pytest.approx(sigmoid(plain[:obj.n1[0]]), abs=1e-6)
    logodds = StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, refusal_stat="logodds")
    assert logodds.fingerprint() != obj.fingerprint()  # a study never mixes the two numbers
    with pytest.raises(ConfigError, match="refusal statistic"):
        StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, refusal_stat="median")


def test_refusal_statistics_and_their_prune_margins():
    assert refusal_statistic([0.0, 0.0], "probability") == 0.5
    assert refusal_statistic([-800.0, 800.0], "probability") == pytest.approx(0.5)  # no overflow
    assert refusal_statistic([-2.0, 4.0], "logodds") == 1.0
    assert PruneRule.for_statistic("probability").refusal_margin == 0.05
    assert PruneRule.for_statistic("logodds") == PruneRule()
    with pytest.raises(ConfigError):
        PruneRule.for_statistic("mean")


def test_pruned_partial_score_equals_the_full_score_on_the_first_prompts(staged_parts):
    adapter, chat, ids = staged_parts
    obj = StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, batch_size=3, fraction=0.25, refusal_stat="logodds")
    assert obj.n1 == (2, 2) == first_stage_sizes(8, 8, 0.25)
    seen = []
    for edit in _edits(adapter):
        before = obj.prefix_passes
        pruned = obj.score(edit, prune=lambda p: seen.append(p) or 7)
        assert pruned.values is None and pruned.pruned_by == 7 and pruned.n_partial == (2, 2)
        assert obj.prefix_passes - before in (1, 2)
        want = _plain(adapter, chat, HARMFUL[:2], HARMLESS[:2], ids, edit)
        assert pruned.partial == pytest.approx(want, abs=1e-5) and seen[-1] == pruned.partial
        full = obj.score(edit, prune=lambda p: None)  # not pruned: the same partial, then every prompt
        assert full.partial == pruned.partial and full.values != full.partial


def test_few_token_score_is_the_substring_rate_with_logit_ties(staged_parts, monkeypatch):
    import math

    from refusal_atlas.evaluation import refusal as refusal_mod
    from refusal_atlas.model.generation import greedy_generate

    adapter, chat, ids = staged_parts
    tok = chat.tokenizer
    # a refusal phrase the tiny vocabulary can produce, so the verdicts are not all equal
    monkeypatch.setattr(refusal_mod, "REFUSAL_SUBSTRINGS", ("sorry", "cannot"))
    monkeypatch.setattr(refusal_mod.is_refusal, "__defaults__", (("sorry", "cannot"),))
    monkeypatch.setattr(refusal_mod.refusal_phrase_in, "__defaults__", (("sorry", "cannot"),))
    from refusal_atlas.evaluation import completions

    monkeypatch.setattr(completions.refusal_decided, "__defaults__", (("sorry", "cannot"),))
    obj = StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, batch_size=3, fraction=0.25, score_tokens=3)
    plain = StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, batch_size=3, fraction=0.25)
    assert obj.fingerprint() != plain.fingerprint()
    seen = set()
    for edit in _edits(adapter):
        before = obj.prefix_passes
        got = obj.score(edit)
        assert obj.prefix_passes - before == 1 + (before == 0)  # generation reuses the trial's prefix pass
        gens = greedy_generate(adapter, chat, HARMFUL, 3, batch_size=3, intervention=edit, fast=False)
        verdicts = [refusal_mod.is_refusal(tok.decode(g.token_ids, skip_special_tokens=True)) for g in gens]
        seen.update(verdicts)
        logit = plain.score(edit).values
        for n, value in ((2, got.partial[0]), (8, got.values[0])):
            mean = _plain(adapter, chat, HARMFUL[:n], HARMLESS, ids, edit)[0]
            assert value == pytest.approx(sum(verdicts[:n]) / n + 0.5 / n / (1 + math.exp(-mean)), abs=1e-6)
        assert got.values[1] == pytest.approx(logit[1], abs=1e-6)  # KL unchanged
    assert seen == {True, False}  # the rate part is exercised, not constant
    with pytest.raises(ConfigError, match="score_tokens"):
        StagedObjective(adapter, chat, HARMFUL, HARMLESS, ids, score_tokens=-1)


def test_prune_rule():
    rule = PruneRule(fraction=0.25, refusal_margin=0.5, kl_ratio=1.5, kl_margin=0.002)
    front = [(0, (-3.0, 0.04)), (4, (-1.0, 0.001))]
    assert rule.dominating((-2.4, 0.062), front) == 0
    assert rule.dominating((-2.6, 0.1), front) is None  # refusal not clearly worse than #0's
    assert rule.dominating((-2.4, 0.061), front) is None  # KL not clearly worse
    assert rule.dominating((-0.4, 0.0036), front) == 4
    for bad in (dict(fraction=1.0), dict(fraction=0.0), dict(kl_ratio=0.9), dict(refusal_margin=-1)):
        with pytest.raises(ConfigError):
            PruneRule(**bad)


# --- the loop, model-free -------------------------------------------------------------------------------
N, D = 6, 8
RULE = PruneRule(fraction=0.25, refusal_margin=0.0, kl_ratio=1.0, kl_margin=0.0)  # prune whatever is dominated


class FakeStaged:
    """Deterministic model-free stand-in with StagedObjective's ``score``: partial = full + an offset."""

    def __init__(self):
        self.calls = 0

    def score(self, edit, prune=None) -> TrialScore:
        self.calls += 1
        s = sum(edit.attn_weights) + 0.5 * sum(edit.mlp_weights)
        full = (-s * (1 + float(edit.per_layer[:, 0, 0].abs().mean())), 0.01 * s ** 2 + 0.02 * edit.norm_preserving)
        partial = (full[0] + 0.1, full[1] * 1.1)
        by = prune(partial) if prune is not None else None
        return TrialScore(partial, (1, 1), None if by is not None else full, by)


def _ctx() -> EditContext:
    g = torch.Generator().manual_seed(0)
    return EditContext(torch.randn(N, D, generator=g), torch.randn(N, D, generator=g), {})


def _run(study, n, objective=None):
    return run_edit_trials(study, EditSpace(N), _ctx(), objective or FakeStaged(), seed=5, n_startup_trials=3,
                           n_trials=n, prune=RULE)


def _summary(study):
    return [(t.number, t.state, t.params, t.values, t.user_attrs.get("partial"), t.user_attrs.get("pruned_by"))
            for t in study.trials if t.state != TrialState.FAIL]


def test_pruned_trials_never_enter_the_front_and_resume_equals_uninterrupted(tmp_path):
    straight = optuna.create_study(directions=["minimize", "minimize"])
    _run(straight, 16)
    pruned = straight.get_trials(states=(TrialState.PRUNED,))
    assert pruned and len(finished(straight)) == 16 and len(completed(straight)) < 16
    front = {t.number for t in pareto_front(straight)}
    by_number = {t.number: t for t in straight.trials}
    for t in pruned:
        assert t.number not in front and t.values is None
        p = t.user_attrs["partial"]
        dom = by_number[t.user_attrs["pruned_by"]]
        assert dom.state == TrialState.COMPLETE and dom.number < t.number
        assert dom.user_attrs["partial"]["refusal"] <= p["refusal"] and dom.user_attrs["partial"]["kl"] <= p["kl"]
    assert all(t.state == TrialState.COMPLETE for t in pareto_front(straight))
    # pruned trials count for the sampler's seed: no trial is proposed twice in a row because of them
    assert len({repr(t.params) for t in straight.trials}) == 16

    study = open_study(tmp_path / "s.db", "e", {"space": "edits"})
    _run(study, 7)
    study.ask()  # left RUNNING by a killed process
    reopened = open_study(tmp_path / "s.db", "e", {"space": "edits"})
    assert fail_stale_trials(reopened) == [7]
    _run(reopened, 9)
    got = [(s, p, v, pa, by) for _, s, p, v, pa, by in _summary(reopened)]
    want = [(s, p, v, pa, by if by is None else by + (by >= 7)) for _, s, p, v, pa, by in _summary(straight)]
    assert got == want  # same proposals, states, values and partial values (trial numbers shift by the failed one)


def summarize_counts(study) -> int:
    from refusal_atlas.search.study import summarize

    return summarize(study, 0.1, {"max_kl": 1.0})["n_trials"]["above_max_kl"]


def test_kl_cap_keeps_edits_above_it_off_the_front_and_prunes_clear_overshoots():
    rule = PruneRule(fraction=0.25, refusal_margin=0.05, kl_ratio=1.5, kl_margin=0.002)
    assert rule.over_cap(0.1525, 0.1) and not rule.over_cap(0.1515, 0.1)
    free = optuna.create_study(directions=["minimize", "minimize"])
    run_edit_trials(free, EditSpace(N), _ctx(), FakeStaged(), seed=5, n_startup_trials=3, n_trials=16, prune=None)
    kls = sorted(t.values[1] for t in completed(free))
    cap = kls[len(kls) // 2]  # half the uncapped trials lie above it
    capped = optuna.create_study(directions=["minimize", "minimize"])
    run_edit_trials(capped, EditSpace(N), _ctx(), FakeStaged(), seed=5, n_startup_trials=3, n_trials=16, prune=rule,
                    max_kl=cap)
    front = pareto_front(capped)
    assert front and all(t.values[1] <= cap for t in front)
    over = [t for t in completed(capped) if t.values[1] > cap]
    assert over, "the cap should bind on some completed trial"
    for t in completed(capped):  # every trial carries the constraint TPE reads
        assert t.constraints["kl_above_max"] == pytest.approx(t.values[1] - cap)
    # FakeStaged's first-stage KL is 1.1 × the full KL: a trial is stopped for the cap iff 1.1 × KL >= 1.5 cap + 0.002
    for t in capped.get_trials(states=(TrialState.PRUNED,)):
        if t.user_attrs["pruned_by"] == "max_kl":
            assert t.user_attrs["partial"]["kl"] >= 1.5 * cap + 0.002 and t.constraints["kl_above_max"] > 0
    assert all(t.user_attrs["partial"]["kl"] < 1.5 * cap + 0.002 for t in completed(capped))
    assert any(t.user_attrs.get("pruned_by") == "max_kl" for t in capped.trials)
    # TPE reads the constraint: fewer of the capped search's 16 trials land above the cap than the free one's 8
    above = sum(t.constraints.get("kl_above_max", 0) > 0 for t in finished(capped))  # dominance-pruned: no value
    assert above == summarize_counts(capped) and above < sum(v > cap for v in kls)
    # a cap no trial meets: the front falls back to every completed trial's front rather than vanishing
    none_fit = optuna.create_study(directions=["minimize", "minimize"])
    run_edit_trials(none_fit, EditSpace(N), _ctx(), FakeStaged(), seed=5, n_startup_trials=3, n_trials=6, prune=None,
                    max_kl=1e-9)
    assert none_fit.best_trials == [] and pareto_front(none_fit)
