"""Mixture-of-experts: hook ablation on the MoE block output equals editing every expert's down-projection."""

import pytest
import torch

from refusal_atlas.core.errors import ModelError
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.model import ChatFormatter, ModelAdapter
from tiny import PROMPTS_MOE, tiny_list_moe_model, tiny_moe_model, tiny_tokenizer


def _check_equivalence(model, dirs):
    adapter, chat = ModelAdapter(model), ChatFormatter(tiny_tokenizer())
    batch = chat.encode(PROMPTS_MOE)
    clean = model(**batch).logits
    with ablate(adapter, dirs):
        hooked = model(**batch).logits
    report = DirectionalAblation(dirs).apply_weights(model)
    edited = model(**batch).logits
    assert torch.allclose(edited, hooked, atol=1e-4), (edited - hooked).abs().max()
    assert not torch.allclose(edited, clean, atol=1e-3)
    return report


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_moe_weight_edit_matches_hook_ablation(arch):
    model = tiny_moe_model(arch)
    report = _check_equivalence(model, torch.randn(2, model.config.hidden_size))
    n_moe = 3 if arch == "qwen2_moe" else 4  # qwen2_moe: layer 1 is dense (mlp_only_layers)
    assert report["moe_layers"] == n_moe
    # qwen2_moe has a shared expert next to the fused experts: two writes per MoE layer
    assert report["mlp_weights"] == (2 * n_moe + 1 if arch == "qwen2_moe" else 4)


def test_every_expert_is_edited_not_only_the_routed_ones():
    model = tiny_moe_model("mixtral")
    d = torch.randn(model.config.hidden_size)
    DirectionalAblation(d).apply_weights(model)
    u = d / d.norm()
    for layer in model.model.layers:
        w = layer.mlp.experts.down_proj  # [E, d, inter]: every expert's output has no component along d
        assert torch.einsum("d,edi->ei", u, w).abs().max() < 1e-5


@pytest.mark.parametrize("fused_transposed", [False, True])
def test_other_expert_layouts_are_edited(fused_transposed):
    model = tiny_list_moe_model(fused_transposed)
    report = _check_equivalence(model, torch.randn(1, model.config.hidden_size))
    assert report["moe_layers"] == 4
    assert report["mlp_weights"] == (4 if fused_transposed else 12)


def test_unsupported_architecture_names_the_supported_ones():
    model = tiny_moe_model("mixtral")
    model.config.model_type = "deepseek_v3"
    with pytest.raises(ModelError, match="unsupported architecture 'deepseek_v3'.*mixtral.*qwen2_moe"):
        ModelAdapter(model)
