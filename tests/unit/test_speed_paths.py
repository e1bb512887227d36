"""The fast paths (shared-prefix reuse, layer skipping, early stop, own argmax loop) against the plain way."""

import pytest
import torch

from refusal_atlas.evaluation.refusal import is_refusal, next_token_logprobs
from refusal_atlas.evaluation.completions import refusal_decided
from refusal_atlas.model.generation import DECODING, greedy_generate, stop_token_ids
from refusal_atlas.edits import ActAdd, DirectionalAblation, NoEdit
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.model.prefix_cache import PrefixPlan, budget_batches, plan_logprobs


@pytest.fixture
def parts(tiny):
    # a system prompt gives the set a real shared prefix, as Qwen's default one does
    return tiny, ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer, system="you are helpful assistant")


def _naive_greedy(model, tokenizer, chat, text, n, eos):
    ids, out = tokenizer(chat.render(text), add_special_tokens=False)["input_ids"], []
    for _ in range(n):
        tok = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(tok)
        if tok in eos:
            break
    return out


def test_greedy_ignores_the_models_generation_config(parts, prompts):
    tiny, adapter, chat = parts
    cfg = tiny.model.generation_config
    cfg.repetition_penalty, cfg.do_sample, cfg.top_k, cfg.no_repeat_ngram_size = 1.5, True, 3, 2
    eos = stop_token_ids(tiny.model, tiny.tokenizer)
    naive = [_naive_greedy(tiny.model, tiny.tokenizer, chat, p, 10, eos) for p in prompts]
    fast = [g.token_ids for g in greedy_generate(adapter, chat, prompts, 10, batch_size=4)]
    plain = [g.token_ids for g in greedy_generate(adapter, chat, prompts, 10, batch_size=4, fast=False)]
    assert fast == naive and plain == naive
    # the model's own config would have changed the tokens (so the test can fail)
    batch = chat.encode(prompts[:1])
    leaked = tiny.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=10)[0, batch["input_ids"].shape[1]:].tolist()
    assert leaked[:len(naive[0])] != naive[0]
    assert DECODING["repetition_penalty"] == 1.0 and DECODING["do_sample"] is False
    assert tiny.model.generation_config.repetition_penalty == 1.5  # restored after generation


def test_prefix_reuse_matches_the_plain_pass(parts, prompts):
    _, adapter, chat = parts
    plan = PrefixPlan(adapter, chat, prompts, 4)
    assert len(plan.prefix) >= 5 and all(plan.suffixes)
    d = torch.randn(adapter.d_model)
    for spec in (None, DirectionalAblation.from_directions(d), ActAdd.from_directions(d, layer=2)):
        fast = next_token_logprobs(adapter, chat, prompts, batch_size=4, intervention=spec)
        plain = next_token_logprobs(adapter, chat, prompts, batch_size=4, intervention=spec, reuse_prefix=False)
        assert (fast - plain).abs().max() < 1e-5
    # steering from the clean block inputs at layer 2 equals running every block
    _, clean = plan_logprobs(plan, capture=[2])
    spec = ActAdd.from_directions(3 * d, layer=2)
    skipped, _ = plan_logprobs(plan, spec, start_layer=2, start_hidden={b: h[2] for b, h in clean.items()})
    full = next_token_logprobs(adapter, chat, prompts, batch_size=4, intervention=spec, reuse_prefix=False)
    assert (skipped - full).abs().max() < 1e-5
    assert (full - next_token_logprobs(adapter, chat, prompts, batch_size=4)).abs().max() > 1e-2  # it did act


def test_budget_batches_cover_every_prompt_once():
    lengths = [40, 5, 6, 7, 5, 6, 30, 5]
    batches = budget_batches(lengths, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 4 for b in batches) and batches[0][0] == 0
    assert [lengths[b[0]] * len(b) for b in batches if len(b) > 1] <= [4 * 6] * len(batches)


def test_early_stop_gives_the_full_length_verdicts(parts, prompts):
    tiny, adapter, chat = parts
    full = greedy_generate(adapter, chat, prompts, 12, batch_size=4)
    texts = [tiny.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in full]
    # a marker that fires early in some rows: the second generated word of the first row
    words = [w for t in texts for w in t.split()[1:3]]
    markers = (words[0],)
    early = greedy_generate(adapter, chat, prompts, 12, batch_size=4,
                            stop_when=refusal_decided(tiny.tokenizer, markers))
    early_texts = [tiny.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in early]
    assert [is_refusal(t, markers) for t in early_texts] == [is_refusal(t, markers) for t in texts]
    decided = [i for i, g in enumerate(early) if g.stop == "decided"]
    assert decided and all(len(early[i].token_ids) < len(full[i].token_ids) for i in decided)
    assert all(full[i].token_ids[:len(g.token_ids)] == g.token_ids for i, g in enumerate(early))
    assert all(g.stop != "decided" and g.token_ids == full[i].token_ids
               for i, g in enumerate(early) if i not in decided)


def test_decided_completions_are_not_reused_at_full_length(parts, prompts, tmp_path, monkeypatch):
    from refusal_atlas.data import Prompt
    from refusal_atlas.evaluation import completions

    tiny, adapter, chat = parts
    texts = [tiny.tokenizer.decode(g.token_ids, skip_special_tokens=True)
             for g in greedy_generate(adapter, chat, prompts, 8, batch_size=4)]
    markers = (texts[0].split()[1],)
    monkeypatch.setattr(completions, "refusal_decided", lambda tok: refusal_decided(tok, markers))
    ps = [Prompt(p) for p in prompts]
    path = tmp_path / "c.jsonl"
    short = completions.completions_for(adapter, chat, ps, NoEdit(), 8, 4, path, stop_when_decided=True)
    n_decided = sum('"stop": "decided"' in line for line in path.read_text().splitlines())
    assert n_decided >= 1
    again = completions.completions_for(adapter, chat, ps, NoEdit(), 8, 4, path, stop_when_decided=True)
    assert again.reused == len(ps) and again.responses == short.responses
    full = completions.completions_for(adapter, chat, ps, NoEdit(), 8, 4, path)
    assert full.reused == len(ps) - n_decided and full.responses == [t.strip() for t in texts]


def test_generation_first_step_gives_the_next_token_logprobs(parts, prompts):
    _, adapter, chat = parts
    spec = DirectionalAblation.from_directions(torch.randn(adapter.d_model))
    gens = greedy_generate(adapter, chat, prompts, 3, batch_size=4, intervention=spec, keep_first_logprobs=True)
    first = torch.stack([g.first_logprobs for g in gens])
    plain = next_token_logprobs(adapter, chat, prompts, batch_size=4, intervention=spec, reuse_prefix=False)
    assert (first - plain).abs().max() < 1e-5
    assert all(g.token_ids[0] == int(plain[i].argmax()) for i, g in enumerate(gens))


def test_evaluate_stops_rows_early_only_when_every_judge_is_the_substring_one(monkeypatch):
    from types import SimpleNamespace

    from refusal_atlas.data import Prompt
    from refusal_atlas.evaluation import evaluate
    from refusal_atlas.evaluation.judges import SubstringJudge

    class ModelJudge(SubstringJudge):  # any judge that is not exactly the substring one reads whole answers
        pass

    sub = evaluate.EvalPlan(datasets=[], interventions=[], judges=[SubstringJudge()], stop_when_decided=True)
    assert sub.early_stop("harmful") and sub.early_stop("harmless") and not sub.early_stop("over_refusal")
    assert not evaluate.EvalPlan(datasets=[], interventions=[], judges=[SubstringJudge()]).early_stop("harmful")
    mixed = evaluate.EvalPlan(datasets=[], interventions=[], judges=[SubstringJudge(), object()],
                              stop_when_decided=True)
    assert not mixed.early_stop("harmful")

    seen = []

    def fake_completions(*args, stop_when_decided=False, **kw):
        seen.append(stop_when_decided)
        return SimpleNamespace(responses=["I cannot"], reused=0, token_ids=[[1]])

    monkeypatch.setattr(evaluate, "load_prompts", lambda name, n, seed: [Prompt("x")])
    monkeypatch.setattr(evaluate, "dataset_role", lambda name: "harmful")
    monkeypatch.setattr(evaluate, "completions_for", fake_completions)
    run = SimpleNamespace(completions_path=lambda *a: None, add_metrics=lambda recs: None)
    plan = evaluate.EvalPlan(datasets=["d"], interventions=[NoEdit()], judges=[SubstringJudge()],
                             stop_when_decided=True)
    evaluate.evaluate_run(None, None, run, plan)
    plan.judges = [SubstringJudge(), ModelJudge()]
    evaluate.evaluate_run(None, None, run, plan)
    assert seen == [True, False]
    custom = evaluate.EvalPlan(datasets=[], interventions=[], judges=[SubstringJudge(substrings=("nope",))],
                               stop_when_decided=True)
    assert not custom.early_stop("harmful")  # the stop rule watches the default phrases only


def test_the_lm_head_gets_a_contiguous_input_once_and_the_logits_do_not_change(tiny):
    """logits_to_keep=1 hands the head a strided slice, which torch's CPU Linear runs up to 500x slower in bf16."""
    ids = torch.randint(5, 60, (3, 7))
    with torch.inference_mode():
        before = tiny.model(input_ids=ids, logits_to_keep=1).logits
    seen = []
    head = tiny.model.get_output_embeddings()
    probe = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    with torch.inference_mode():
        tiny.model(input_ids=ids, logits_to_keep=1)
    assert seen == [False]  # without the adapter the head sees the slice
    probe.remove()
    ModelAdapter(tiny.model)
    ModelAdapter(tiny.model)  # a second adapter on the same model adds no second hook
    assert len(head._forward_pre_hooks) == 1
    probe = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    with torch.inference_mode():
        after = tiny.model(input_ids=ids, logits_to_keep=1).logits
    probe.remove()
    assert seen == [False, True]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # another kernel: rounding only


def test_a_bf16_model_gets_a_float32_head_that_follows_in_place_edits(tiny):
    from refusal_atlas.model.adapter import float32_head_output

    model = tiny.model.to(torch.bfloat16)
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    float32_head_output(model)
    float32_head_output(model)  # once per model
    assert head._refusal_atlas_fp32
    ids = torch.randint(5, 60, (2, 5))
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=1).logits
    assert logits.dtype == torch.float32
    expected = torch.nn.functional.linear(seen[-1].float(), head.weight.float())
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        head.weight.mul_(2)  # an edit made in place must reach the cached float32 weight
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=1).logits
    torch.testing.assert_close(logits, torch.nn.functional.linear(seen[-1].float(), head.weight.float()),
                               rtol=1e-6, atol=1e-6)
