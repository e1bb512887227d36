"""Damage metrics on a tiny model: first-token and teacher-forced n-token KL, metric names, CIs."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from refusal_atlas.evaluation.damage import (continuation_kl, greedy_continuations, kl_records, next_token_kl,
                                             refusal_metric)
from refusal_atlas.evaluation.refusal import next_token_logprobs
from refusal_atlas.evaluation.stats import mean_record
from refusal_atlas.model.generation import generate
from refusal_atlas.edits import DirectionalAblation


class Identity:
    """An intervention that changes nothing (hooks context that does nothing)."""

    kind = "custom"

    def apply(self, adapter):
        return contextlib.nullcontext()


def test_next_token_kl_zero_iff_equal():
    lp = torch.log_softmax(torch.randn(3, 10), dim=-1)
    assert torch.allclose(next_token_kl(lp, lp), torch.zeros(3, dtype=torch.float64))
    assert (next_token_kl(lp, torch.log_softmax(torch.randn(3, 10), dim=-1)) > 0).all()


def test_greedy_continuations_truncate_exactly_and_match_generate(tiny_parts, prompts):
    _, adapter, chat = tiny_parts
    long = greedy_continuations(adapter, chat, prompts, 12, batch_size=2)
    short = greedy_continuations(adapter, chat, prompts, 5, batch_size=2)
    assert all(a[:len(b)] == b for a, b in zip(long, short))  # greedy: a prefix is the shorter run
    texts = generate(adapter, chat, prompts, 12, batch_size=2)
    assert texts == [chat.tokenizer.decode(x, skip_special_tokens=True).strip() for x in long]


def test_continuation_kl_is_zero_without_change_and_matches_first_token_kl(tiny_parts, prompts):
    _, adapter, chat = tiny_parts
    conts = greedy_continuations(adapter, chat, prompts, 6, batch_size=3)
    conts[1] = conts[1][:2]  # a short continuation → NaN past its end
    same = continuation_kl(adapter, chat, prompts, conts, Identity(), batch_size=4)
    assert same.shape == (len(prompts), 6)
    assert torch.nan_to_num(same).abs().max() < 1e-9
    assert torch.isnan(same[1, 2:]).all() and not torch.isnan(same[1, :2]).any()

    torch.manual_seed(1)
    spec = DirectionalAblation.from_directions(torch.randn(1, adapter.d_model))
    kl = continuation_kl(adapter, chat, prompts, conts, spec, batch_size=4)
    assert (kl[:, 0] > 0).all()
    base = next_token_logprobs(adapter, chat, prompts)
    new = next_token_logprobs(adapter, chat, prompts, intervention=spec)
    assert torch.allclose(kl[:, 0], next_token_kl(base, new), rtol=1e-3, atol=1e-7)


def test_continuation_kl_reads_the_continuation(tiny_parts, prompts):
    """Teacher forcing on a different continuation changes the later-step KL (it is not ignored)."""
    _, adapter, chat = tiny_parts
    torch.manual_seed(2)
    spec = DirectionalAblation.from_directions(torch.randn(1, adapter.d_model))
    a = continuation_kl(adapter, chat, prompts[:2], [[5, 6, 7], [5, 6, 7]], spec)
    b = continuation_kl(adapter, chat, prompts[:2], [[9, 10, 11], [9, 10, 11]], spec)
    assert torch.allclose(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_kl_records_carry_n_and_interval():
    kl = torch.tensor([[0.1, 0.3, float("nan")], [0.2, 0.2, 0.2], [0.0, 0.4, 0.1]], dtype=torch.float64)
    first, multi = kl_records(kl, 3)
    assert first["metric"] == "kl_first_token" and first["n"] == 3
    assert first["kl"] == pytest.approx(0.1)
    assert first["ci95"][0] <= first["kl"] <= first["ci95"][1]
    assert multi["metric"] == "kl_first_3_tokens" and multi["token_steps"] == 8
    assert multi["kl"] == pytest.approx((0.2 + 0.2 + 0.5 / 3) / 3)


def test_mean_record_interval():
    rec = mean_record([1.0] * 5)
    assert rec["ci95"] == [1.0, 1.0] and rec["n"] == 5
    wide = mean_record([0.0, 10.0] * 10)
    assert wide["ci95"][0] < 5.0 < wide["ci95"][1]
    assert not math.isnan(wide["mean"])


def test_refusal_metric_names():
    assert refusal_metric("over_refusal", "none") == "over_refusal_rate"
    assert refusal_metric("harmless", "actadd") == "induced_refusal_rate"
    assert refusal_metric("harmless", "ablate") == "refusal_rate"
    assert refusal_metric("harmful", "ablate") == "refusal_rate"
