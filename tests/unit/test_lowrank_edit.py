"""The low-rank (ARA-style) edit: hooks equal weights, restore, save/load, the exact PEFT adapter (PEFT loads
it; merged it equals the weight form), every export format through export_model, and bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits import LowRankEdit, load_edit
from refusal_atlas.export.formats import export_model
from refusal_atlas.export.lora import write_lowrank_adapter
from refusal_atlas.model import ChatFormatter, ModelAdapter
from tiny import TinyLoaded, tiny_bpe_tokenizer, tiny_model

PROMPTS = ["how to make a bomb", "write poem about cats please", "tell joke", "hack into computer"]


def random_lowrank(model, layers=(1, 2), rank=3, components=("attn", "mlp"), seed=0, scale=0.3) -> LowRankEdit:
    adapter = ModelAdapter(model)
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in layers:
        for comp in components:
            proj = adapter.attn_out_proj(layer) if comp == "attn" else adapter.mlp_out_proj(layer)
            factors[(layer, comp)] = (scale * torch.randn(rank, proj.in_features, generator=g),
                                      scale * torch.randn(proj.out_features, rank, generator=g))
    return LowRankEdit(factors, adapter.n_layers, name="ara")


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("llama", True), ("mistral", False), ("gemma2", False)])
def test_hooks_equal_weights_restore_and_formula(arch, tie):
    tiny = TinyLoaded(arch, tie=tie)
    model, adapter = tiny.model, ModelAdapter(tiny.model)
    batch = ChatFormatter(tiny.tokenizer).encode(PROMPTS)
    clean = model(**batch).logits
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    edit = random_lowrank(model)
    assert edit.evaluated_form == "hooks" and edit.rank == 3 and edit.targets == [(1, "attn"), (1, "mlp"),
                                                                                    (2, "attn"), (2, "mlp")]
    with edit.hooks(adapter):
        hooked = model(**batch).logits
    with edit.weights(adapter) as report:
        weighted = model(**batch).logits
        a, b = edit.factors[(2, "mlp")]
        assert torch.allclose(adapter.mlp_out_proj(2).weight, before["model.layers.2.mlp.down_proj.weight"] + b @ a,
                              atol=1e-6)
    assert report == {"rank": 3, "matrices": 4, "layers": [1, 2]}
    assert torch.allclose(hooked, weighted, atol=1e-4), (hooked - weighted).abs().max()
    assert not torch.allclose(hooked, clean, atol=1e-3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # bit-identical restore
    assert torch.equal(model(**batch).logits, clean)
    with edit.scaled(0.0).apply(adapter):  # strength 0: B·A = 0
        assert torch.allclose(model(**batch).logits, clean, atol=1e-6)


def test_hooks_carry_gradients_to_the_factors():
    tiny = TinyLoaded("qwen2")
    adapter = ModelAdapter(tiny.model)
    batch = ChatFormatter(tiny.tokenizer).encode(PROMPTS)
    a = torch.randn(2, adapter.attn_out_proj(1).in_features, requires_grad=True)
    b = torch.zeros(adapter.d_model, 2, requires_grad=True)
    from refusal_atlas.edits.lowrank import add_low_rank

    with add_low_rank(adapter, {(1, "attn"): (a, b)}):
        tiny.model(**batch).logits.square().mean().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0  # B = 0 (LoRA's start) still gets a gradient
    assert a.grad is not None and torch.equal(a.grad, torch.zeros_like(a))  # ... and A none until B moves


def test_save_load_fingerprint_and_bad_input(tmp_path):
    tiny = TinyLoaded("qwen2")
    edit = random_lowrank(tiny.model)
    edit.save(tmp_path / "ara")
    back = load_edit(tmp_path / "ara")
    assert isinstance(back, LowRankEdit) and back.fingerprint() == edit.fingerprint()
    assert all(torch.equal(back.factors[t][i], edit.factors[t][i]) for t in edit.factors for i in (0, 1))
    assert edit.scaled(0.5).fingerprint() != edit.fingerprint()
    assert edit.directions.shape == (4 * 3, edit.d_model)
    doc = json.loads((tmp_path / "ara.json").read_text())
    assert doc["edit"] == "lowrank" and doc["spec"]["rank"] == 3
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    with pytest.raises(ConfigError, match="at least one target"):
        LowRankEdit({}, 4)
    with pytest.raises(ConfigError, match="bad low-rank target"):
        LowRankEdit({(4, "attn"): (a, b)}, 4)
    with pytest.raises(ConfigError, match="bad low-rank target"):
        LowRankEdit({(0, "embed"): (a, b)}, 4)
    with pytest.raises(ConfigError, match="A must be"):
        LowRankEdit({(0, "attn"): (a, torch.randn(32, 3))}, 4)
    with pytest.raises(ConfigError, match="same rank"):
        LowRankEdit({(0, "attn"): (a, b), (1, "attn"): (torch.randn(3, 32), torch.randn(32, 3))}, 4)
    with pytest.raises(ConfigError, match="NaN"):
        LowRankEdit({(0, "attn"): (a * float("nan"), b)}, 4)
    wide = LowRankEdit({(0, "mlp"): (torch.randn(2, 32), b)}, 4)  # down_proj takes 64 inputs, not 32
    with pytest.raises(ModelError, match="inputs of width 32"):
        wide.hooks(tiny.model)
    with pytest.raises(ModelError, match="made for 5 layers"):
        LowRankEdit({(0, "attn"): (a, b)}, 5).hooks(tiny.model)


def test_peft_loads_the_adapter_and_its_merge_is_the_weight_form(tmp_path):
    from peft import PeftModel

    tiny = TinyLoaded("llama", tie=True)
    batch = ChatFormatter(tiny.tokenizer).encode(PROMPTS)
    edit = random_lowrank(tiny.model, layers=(0, 3), rank=4)
    summary = write_lowrank_adapter(tiny.model, edit, tmp_path, base_model="tiny")
    assert summary == {"rank": 4, "modules": 4, "exact": True}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and "model.layers.3.mlp.down_proj" in config["target_modules"]
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    a, b = edit.factors[(3, "mlp")]
    assert torch.equal(stored["base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"], a)  # A, B as trained
    assert torch.equal(stored["base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"], b)
    with edit.weights(tiny.model):
        expected = tiny.model(**batch).logits
    peft_model = PeftModel.from_pretrained(TinyLoaded("llama", tie=True).model, tmp_path)
    assert torch.allclose(peft_model(**batch).logits, expected, atol=1e-4)  # unmerged adapter
    merged = peft_model.merge_and_unload()
    assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
    fresh = TinyLoaded("llama", tie=True).model
    edit.apply_weights(fresh)
    for name, w in fresh.state_dict().items():  # merged weights = our weight form, matrix by matrix
        assert torch.allclose(merged.state_dict()[name], w, atol=1e-6), name


@pytest.mark.parametrize("fmt", ["safetensors", "lora", "gguf"])
def test_every_export_format_carries_the_merged_edit(fmt, tmp_path):
    tok = tiny_bpe_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok) + 5)
    batch = ChatFormatter(tok).encode(PROMPTS)
    edit = random_lowrank(model, rank=2)
    with edit.apply(model):
        evaluated = model(**batch).logits
    loaded = SimpleNamespace(model=model, tokenizer=tok, source="tiny", name="tiny")
    summary = export_model(loaded, edit.apply_weights, tmp_path / "out", fmt, quant="f32" if fmt == "gguf" else None)
    assert summary["edit"]["rank"] == 2
    if fmt == "lora":
        from peft import PeftModel

        assert summary["lora"]["rank"] == 2 and summary["lora"]["max_relative_error"] < 1e-5
        back = PeftModel.from_pretrained(tiny_model("qwen2", vocab_size=len(tok) + 5), tmp_path / "out")
    elif fmt == "gguf":
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    else:
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(back.eval()(**batch).logits, evaluated, atol=1e-4)


def test_mixture_of_experts_mlps_are_refused():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                               moe_intermediate_size=8, shared_expert_intermediate_size=8,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               num_experts=4, num_experts_per_tok=2)).eval()
    edit = LowRankEdit({(0, "mlp"): (torch.randn(2, 8), torch.randn(16, 2))}, 2)
    with pytest.raises(ModelError, match="mixture of experts"):
        edit.hooks(model)
    attn_only = LowRankEdit({(0, "attn"): (torch.randn(2, 16), torch.randn(16, 2))}, 2)
    with attn_only.hooks(model):
        pass
