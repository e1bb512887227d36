"""Mixture-of-experts: hook ablation on the MoE block output equals editing every expert's down-projection."""

import pytest
import torch
from torch import nn

from refusal_atlas.core.errors import ModelError
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.model import ChatFormatter, ModelAdapter
from tiny import PROMPTS_MOE, tiny_moe_model, tiny_tokenizer


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


class _ListExpertsBlock(nn.Module):
    """A hand-rolled MoE block with per-expert Linear layers (the pre-5.x layout) or a transposed fused tensor."""

    def __init__(self, d: int, inter: int, n_experts: int = 3, fused_transposed: bool = False):
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.fused = fused_transposed
        if fused_transposed:
            self.experts = nn.Module()
            self.experts.is_transposed = True
            self.experts.up = nn.Parameter(torch.randn(n_experts, d, inter) / d ** 0.5)
            self.experts.down_proj = nn.Parameter(torch.randn(n_experts, inter, d) / inter ** 0.5)
            self.experts.down_proj_bias = nn.Parameter(torch.randn(n_experts, d) * 0.1)
        else:
            self.experts = nn.ModuleList(nn.ModuleDict({"up_proj": nn.Linear(d, inter), "w2": nn.Linear(inter, d)})
                                         for _ in range(n_experts))
            for e in self.experts:
                e.w2 = e["w2"]

    def forward(self, x):
        weights = torch.softmax(self.gate(x), dim=-1)  # dense routing: every expert contributes
        outs = []
        for i in range(weights.shape[-1]):
            if self.fused:
                h = torch.relu(x @ self.experts.up[i])
                outs.append(h @ self.experts.down_proj[i] + self.experts.down_proj_bias[i])
            else:
                outs.append(self.experts[i]["w2"](torch.relu(self.experts[i]["up_proj"](x))))
        return sum(w.unsqueeze(-1) * o for w, o in zip(weights.unbind(-1), outs))


@pytest.mark.parametrize("fused_transposed", [False, True])
def test_other_expert_layouts_are_edited(fused_transposed):
    from tiny import tiny_model

    model = tiny_model("qwen2")
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = _ListExpertsBlock(model.config.hidden_size, 16, fused_transposed=fused_transposed)
    model.requires_grad_(False)
    report = _check_equivalence(model, torch.randn(1, model.config.hidden_size))
    assert report["moe_layers"] == 4
    assert report["mlp_weights"] == (4 if fused_transposed else 12)


def test_unsupported_architecture_names_the_supported_ones():
    model = tiny_moe_model("mixtral")
    model.config.model_type = "deepseek_v3"
    with pytest.raises(ModelError, match="unsupported architecture 'deepseek_v3'.*mixtral.*qwen2_moe"):
        ModelAdapter(model)
