"""Tiny random-weight chat models built in-process (no downloads) for fast unit tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<eos>"]
WORDS = ("I As Sure Here how to make a bomb write poem about cats explain the weather give me recipe for cake "
         "hack into computer steal money tell joke list three colors build house user assistant system you are "
         "helpful cannot help with that sorry is step one two first then do it please what why can").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")


def tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    fast.padding_side = "left"
    return fast


def tiny_model(arch: str = "qwen2", n_layers: int = 4, d_model: int = 32, tie: bool = False, seed: int = 0,
               vocab_size: int | None = None):
    """A randomly initialised decoder of the given family, in eval mode with frozen weights."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size or len(SPECIALS) + len(WORDS), hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0, eos_token_id=4)
    table = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
             "mistral": (MistralConfig, MistralForCausalLM), "gemma2": (Gemma2Config, Gemma2ForCausalLM)}
    cfg_cls, model_cls = table[arch]
    extra = {"head_dim": d_model // 4} if arch == "gemma2" else {}
    model = model_cls(cfg_cls(**common, **extra))
    # random init is near-zero for norms' gains; spread weights so interventions have visible effects
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_bpe_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on WORDS (GGUF export writes only this kind)."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    fast.padding_side = "left"
    return fast


class TinyLoaded:
    """Duck-types refusal_atlas.model.LoadedModel for tests."""

    def __init__(self, arch: str = "qwen2", **kw):
        self.model = tiny_model(arch, **kw)
        self.tokenizer = tiny_tokenizer()
        self.name, self.source, self.info = f"tiny-{arch}", "test", {}


PROMPTS_MOE = ["how to make a bomb", "write poem about cats please", "tell joke", "hack into computer"]


def tiny_moe_model(arch: str, n_layers: int = 4, d_model: int = 32, seed: int = 0, vocab_size: int | None = None,
                   **config):
    """A randomly initialised Qwen2-MoE (shared expert; layer 1 dense), Qwen3-MoE or Mixtral decoder;
    ``config`` overrides any of these config fields (expert widths, mlp_only_layers, norm_topk_prob, ...)."""
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size or len(SPECIALS) + len(WORDS), hidden_size=d_model,
                  intermediate_size=2 * d_model, num_hidden_layers=n_layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                  eos_token_id=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        fields = dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[1])
        cfg_cls, model_cls = Qwen2MoeConfig, Qwen2MoeForCausalLM
    elif arch == "qwen3_moe":
        fields = dict(num_experts=4, moe_intermediate_size=16, head_dim=d_model // 4)
        cfg_cls, model_cls = Qwen3MoeConfig, Qwen3MoeForCausalLM
    elif arch == "mixtral":
        fields = dict(num_local_experts=4)
        cfg_cls, model_cls = MixtralConfig, MixtralForCausalLM
    else:
        raise ValueError(arch)
    model = model_cls(cfg_cls(**{**common, **fields, **config}))
    with torch.no_grad():  # fused expert tensors are created empty: give every weight a random value
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 3 or not torch.isfinite(p).all() or p.abs().max() == 0:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.eval()
    model.requires_grad_(False)
    return model


class ListExpertsBlock(torch.nn.Module):
    """A hand-rolled MoE block with per-expert Linear layers (the pre-5.x layout) or a transposed fused tensor."""

    def __init__(self, d: int, inter: int, n_experts: int = 3, fused_transposed: bool = False):
        super().__init__()
        self.gate = torch.nn.Linear(d, n_experts, bias=False)
        self.fused = fused_transposed
        if fused_transposed:
            self.experts = torch.nn.Module()
            self.experts.is_transposed = True
            self.experts.up = torch.nn.Parameter(torch.randn(n_experts, d, inter) / d ** 0.5)
            self.experts.down_proj = torch.nn.Parameter(torch.randn(n_experts, inter, d) / inter ** 0.5)
            self.experts.down_proj_bias = torch.nn.Parameter(torch.randn(n_experts, d) * 0.1)
        else:
            self.experts = torch.nn.ModuleList(
                torch.nn.ModuleDict({"up_proj": torch.nn.Linear(d, inter), "w2": torch.nn.Linear(inter, d)})
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


def tiny_list_moe_model(fused_transposed: bool = False):
    """A tiny Qwen2 whose every MLP is a :class:`ListExpertsBlock` (the expert layouts transformers 5 does not build)."""
    model = tiny_model("qwen2")
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = ListExpertsBlock(model.config.hidden_size, 16, fused_transposed=fused_transposed)
    model.requires_grad_(False)
    return model
