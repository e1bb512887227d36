"""Edits as hooks: ablation and ActAdd hooks, hooks equal weight orthogonalization, NoEdit, and the one
hook handle (model/hooks.py) that removes every hook it registered, on exit and on error."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import ActAdd, DirectionalAblation, NoEdit, load_edit
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.edits.actadd import add_activation
from refusal_atlas.evaluation.completions import intervention_fingerprint
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.model.hooks import Hooks, hook_inputs, hook_outputs
from refusal_atlas.model.saving import save_model_dir
from tiny import TinyLoaded


def _capture_block_inputs(adapter):
    seen = {}

    def hook(layer):
        def fn(module, args, kwargs):
            seen[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return fn

    handles = [adapter.layers[l].register_forward_pre_hook(hook(l), with_kwargs=True)
               for l in range(adapter.n_layers)]
    return seen, handles


def _capture_writes(adapter):
    seen = []

    def fn(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = []
    for l in range(adapter.n_layers):
        handles.append(adapter.attn_write(l).register_forward_hook(fn))
        handles.append(adapter.mlp_write(l).register_forward_hook(fn))
    return seen, handles


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral", "gemma2"])
def test_ablation_removes_direction_everywhere(arch, prompts):
    tiny = TinyLoaded(arch)
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    d = torch.randn(2, adapter.d_model)
    batch = chat.encode(prompts)
    with ablate(adapter, d):
        inputs, h1 = _capture_block_inputs(adapter)
        writes, h2 = _capture_writes(adapter)  # registered after the ablation hooks: sees ablated outputs
        out = tiny.model(**batch).logits
        for h in h1 + h2:
            h.remove()
    unit = torch.nn.functional.normalize(d, dim=1)
    for layer, x in inputs.items():
        assert (x @ unit.T).abs().max() < 1e-4, f"layer {layer} input keeps the direction"
    assert len(writes) == 2 * adapter.n_layers
    for w in writes:
        assert (w @ unit.T).abs().max() < 1e-4
    base = tiny.model(**batch).logits
    assert not torch.allclose(out, base)  # it did something
    # hooks are gone after the context
    assert torch.allclose(tiny.model(**batch).logits, base)


def test_gemma2_writes_are_post_norms():
    adapter = ModelAdapter(TinyLoaded("gemma2").model)
    assert adapter.has_post_norms
    assert adapter.attn_write(0) is adapter.layers[0].post_attention_layernorm
    assert adapter.mlp_write(0) is adapter.layers[0].post_feedforward_layernorm


def test_actadd_changes_only_its_layer_input(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    v = torch.randn(adapter.d_model)
    batch = chat.encode(prompts)
    inputs, handles = _capture_block_inputs(adapter)
    tiny.model(**batch)
    clean = dict(inputs)
    with add_activation(adapter, v, layer=2, coeff=-0.5):
        tiny.model(**batch)
    for h in handles:
        h.remove()
    assert torch.allclose(inputs[0], clean[0]) and torch.allclose(inputs[1], clean[1])
    # the hooks registered first (ours, before ActAdd) see the clean input at layer 2; the model sees +coeff·v:
    # check the downstream effect instead: layer 3 input differs
    assert not torch.allclose(inputs[3], clean[3])


def test_actadd_adds_exactly_coeff_times_vector(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    v = torch.randn(adapter.d_model)
    batch = chat.encode(prompts)

    def block1_input():
        got = {}

        def grab(module, args, kwargs):
            got["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

        h = adapter.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
        tiny.model(**batch)
        h.remove()
        return got["x"]

    with add_activation(adapter, v, layer=1, coeff=2.0):
        shifted = block1_input()  # registered after ActAdd's hook, so it sees the shifted input
    clean = block1_input()
    assert torch.allclose(shifted - clean, (2.0 * v).expand_as(clean), atol=1e-5)


def test_ablation_gradients_flow_to_direction(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    r = torch.randn(adapter.d_model, requires_grad=True)
    with ablate(adapter, r / r.norm()):
        loss = tiny.model(**chat.encode(prompts)).logits.logsumexp(-1).mean()
    loss.backward()
    assert r.grad is not None and torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


def test_bad_inputs(tiny_parts):
    _, adapter, _ = tiny_parts
    with pytest.raises(ModelError, match="out of range"):
        with ablate(adapter, torch.randn(adapter.d_model), layers=[99]):
            pass
    with pytest.raises(ConfigError):
        DirectionalAblation.from_directions(None)
    with pytest.raises(ConfigError, match="unknown ablation mode"):
        with ablate(adapter, torch.randn(adapter.d_model), mode="weird"):
            pass


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        ModelAdapter(model)


# --- hooks equal weight orthogonalization (export) --------------------------------------------------
@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("llama", True), ("mistral", False)])
def test_orthogonalized_weights_match_hook_ablation(arch, tie, prompts, tmp_path):
    tiny = TinyLoaded(arch, tie=tie)
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    assert adapter.embeddings_tied == tie
    dirs = torch.randn(2, adapter.d_model)
    batch = chat.encode(prompts)
    clean = tiny.model(**batch).logits
    with ablate(adapter, dirs):
        hooked = tiny.model(**batch).logits
    report = DirectionalAblation(dirs).apply_weights(tiny.model)
    edited = tiny.model(**batch).logits
    assert report["untied_embeddings"] == tie
    assert torch.allclose(edited, hooked, atol=1e-4), (edited - hooked).abs().max()
    assert not torch.allclose(edited, clean, atol=1e-3)
    # the exported directory reloads to the same logits, with the unembedding untouched
    save_model_dir(tiny.model, tiny.tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.allclose(reloaded(**batch).logits, hooked, atol=1e-4)
    assert not reloaded.config.tie_word_embeddings


def test_weight_export_refused_for_post_norm_architectures():
    tiny = TinyLoaded("gemma2")
    with pytest.raises(ModelError, match="post-norms"):
        DirectionalAblation(torch.randn(tiny.model.config.hidden_size)).apply_weights(tiny.model)


def test_a_direction_sets_ablation_is_evaluated_with_hooks_in_either_mode(tiny_parts, prompts):
    """The ablation evaluate/select/search measure a direction set with: its hooks, also for correlated
    directions in sequential mode (where the weight form differs), exactly as the set's own vectors give."""
    tiny, adapter, chat = tiny_parts
    batch = chat.encode(prompts)
    dirs = torch.randn(2, adapter.d_model, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dirs[1] += 2 * dirs[0]
    ds = DirectionSet(dirs, layer=1, method="som")
    edit = DirectionalAblation.from_directions(ds, "sequential")
    assert edit.evaluated_form == "hooks" and not edit.hooks_equal_weights
    assert DirectionalAblation(ds, "sequential").evaluated_form == "weights"  # the edit artifact: its weights
    with ablate(adapter, ds, mode="sequential"):
        reference = tiny.model(**batch).logits
    with edit.apply(adapter):
        assert torch.equal(tiny.model(**batch).logits, reference)
    assert edit.directions is ds.vectors  # the set as given (float64 here), not the edit's float32 copy


# --- NoEdit -------------------------------------------------------------------------------------------
def test_no_edit_changes_nothing_and_is_recorded_as_none(tiny_parts, prompts, tmp_path):
    tiny, adapter, chat = tiny_parts
    batch = chat.encode(prompts)
    clean = tiny.model(**batch).logits
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    edit = NoEdit()
    for form in (edit.apply(adapter), edit.hooks(adapter), edit.apply(tiny.model)):
        with form:
            assert torch.equal(tiny.model(**batch).logits, clean)
    with edit.weights(adapter) as report:
        assert report == {} and torch.equal(tiny.model(**batch).logits, clean)
    assert edit.apply_weights(tiny.model) == {}
    assert all(torch.equal(v, state[k]) for k, v in tiny.model.state_dict().items())
    assert torch.equal(tiny.model(**batch).logits, clean)
    # records: what Intervention("none") wrote, so existing baseline rows and completions stay matched
    assert (edit.kind, edit.label, edit.directions, edit.fingerprint()) == ("none", "none", None, None)
    assert json.dumps(edit.describe()) == '{"intervention": "none", "kind": "none"}'
    assert intervention_fingerprint(edit) == "bf070374353065ee"  # the key in every run directory written so far
    assert isinstance(load_edit(edit.save(tmp_path / "none")), NoEdit)


def test_edits_of_a_direction_set_keep_their_recorded_names_and_keys():
    """Labels, describe() fields (in order) and completions keys of ablation/ActAdd made from a direction
    set are those earlier versions recorded (the pinned keys were computed by the Intervention class)."""
    d = DirectionSet(torch.ones(1, 8), layer=1, method="dim")
    ablation = DirectionalAblation.from_directions(d)
    assert ablation.describe() == {"intervention": "ablate:dim", "kind": "ablate", "method": "dim", "directions": None,
                                   "fingerprint": d.fingerprint(), "layer": 1, "direction_ids": [0], "k": 1,
                                   "mode": "subspace"}
    assert list(ablation.describe()) == ["intervention", "kind", "method", "directions", "fingerprint", "layer",
                                         "direction_ids", "k", "mode"]
    assert intervention_fingerprint(ablation) == "ade11293dd3b2e3a"
    actadd = ActAdd.from_directions(d, 1.0)
    assert actadd.label == "actadd:dim@1x1" and list(actadd.describe())[-1] == "coeff"
    assert actadd.describe()["coeff"] == 1.0 and intervention_fingerprint(actadd) == "ff041be616d40bc5"
    two = DirectionSet(torch.eye(2, 8), layer=16, method="rdo", ids=[3, 5])
    two.name = "rdo_b"
    assert DirectionalAblation.from_directions(two).label == "ablate:rdo_b[k=2,subspace]"
    assert ActAdd.from_directions(two, 1.0).label == "actadd:rdo_b@16x1"
    assert DirectionalAblation.from_directions(two, label="ablate:mine").label == "ablate:mine"
    # a saved edit is named by its own file and fingerprint instead
    saved = DirectionalAblation(two, name="search_best")
    assert saved.label == f"edit:search_best@{saved.fingerprint()[:8]}" and saved.describe()["edit"] == "ablation"


# --- the hook handle ----------------------------------------------------------------------------------
def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_handle_removes_every_hook_on_exit_and_on_error(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    batch = chat.encode(prompts)
    before_hooks = _hook_count(tiny.model)  # the LM head's permanent contiguity hook, if any
    clean = tiny.model(**batch).logits
    seen = []
    with Hooks() as hooks:
        hooks.inputs(adapter.layers[0], lambda x: x * 0.5)
        hooks.outputs(adapter.mlp_write(1), lambda y: y + 1.0)
        hooks.inputs(adapter.layers[2], seen.append)  # returns None: observes, changes nothing
        assert len(hooks) == 3 and _hook_count(tiny.model) == before_hooks + 3
        edited = tiny.model(**batch).logits
    assert len(seen) == 1 and not torch.allclose(edited, clean)
    assert _hook_count(tiny.model) == before_hooks and torch.equal(tiny.model(**batch).logits, clean)
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks() as hooks:
            hooks.inputs(adapter.layers[0], lambda x: x * 0.5).outputs(adapter.layers[1], lambda y: -y)
            raise RuntimeError("boom")
    assert _hook_count(tiny.model) == before_hooks and torch.equal(tiny.model(**batch).logits, clean)
    # a registration failing part-way (ablation of layers [0, 99]) leaves nothing behind either
    with pytest.raises(ModelError, match="out of range"):
        with ablate(adapter, torch.randn(adapter.d_model), layers=[0, 1, 99]):
            pass
    assert _hook_count(tiny.model) == before_hooks and torch.equal(tiny.model(**batch).logits, clean)
    # single hooks as handles: remove() is enough, twice is harmless
    handle = hook_outputs(adapter.attn_write(0), lambda y: y * 3)
    assert not torch.equal(tiny.model(**batch).logits, clean)
    handle.remove()
    handle.remove()
    assert _hook_count(tiny.model) == before_hooks and torch.equal(tiny.model(**batch).logits, clean)


def test_observing_hook_is_bit_identical_and_keyword_hidden_states_are_seen():
    class Block(nn.Module):
        def forward(self, hidden_states, scale=1.0):
            return hidden_states * scale, "extra"

    block, x = Block(), torch.randn(2, 3)
    seen = []
    with hook_inputs(block, seen.append), hook_outputs(block, seen.append):
        out = block(hidden_states=x, scale=2.0)
    assert torch.equal(out[0], 2 * x) and out[1] == "extra"  # None from a hook: unchanged, bit for bit
    assert torch.equal(seen[0], x) and torch.equal(seen[1], 2 * x)
    with hook_inputs(block, lambda h: h + 1):  # a replacement given by keyword reaches the module by keyword
        assert torch.equal(block(hidden_states=x, scale=2.0)[0], 2 * (x + 1))
        assert torch.equal(block(x)[0], x + 1)
    assert torch.equal(block(hidden_states=x)[0], x)
