import pytest
import torch

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits.interventions import Intervention, ablate, add_activation
from refusal_atlas.model import ModelAdapter
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
    from refusal_atlas.model import ChatFormatter

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
        Intervention("ablate", None)
    with pytest.raises(ConfigError, match="unknown ablation mode"):
        with ablate(adapter, torch.randn(adapter.d_model), mode="weird"):
            pass


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        ModelAdapter(model)
