"""Where the residual stream is, for each supported architecture.

Interventions and extraction never poke at model attributes directly: they ask the adapter for
the decoder blocks, the modules whose outputs are *added to the residual stream* (the residual
"writes"), the embedding, and the weight matrices that write along d_model. Gemma-2/3 rescale
attention and MLP outputs with post-norms before the residual add, so their writes are the
post-norm modules, and weight orthogonalization is not equivalent to hook ablation for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refusal_atlas.errors import ModelError


@dataclass(frozen=True)
class _Family:
    attn_write: str  # module (relative to a block) whose output joins the residual after attention
    mlp_write: str
    attn_out_proj: str  # the Linear that writes the attention output along d_model
    mlp_out_proj: str
    post_norms: bool


_STANDARD = _Family("self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", post_norms=False)
_POST_NORM = _Family("post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj",
                     "mlp.down_proj", post_norms=True)

FAMILIES: dict[str, _Family] = {
    "qwen2": _STANDARD,
    "qwen3": _STANDARD,
    "llama": _STANDARD,
    "mistral": _STANDARD,
    "gemma": _STANDARD,
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
}


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class ModelAdapter:
    """Uniform access to a decoder-only model's blocks and residual writes."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise ModelError(
                f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}. "
                "Add an entry to refusal_atlas.model.adapter.FAMILIES if its blocks follow the same layout."
            )
        self.model = model
        self.model_type: str = model_type
        self.family = FAMILIES[model_type]
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers"):
            raise ModelError(f"cannot find decoder layers (model.model.layers) in {type(model).__name__}")
        self.base: nn.Module = base
        self.layers: nn.ModuleList = base.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def has_post_norms(self) -> bool:
        return self.family.post_norms

    @property
    def embedding(self) -> nn.Embedding:
        return self.base.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def embeddings_tied(self) -> bool:
        head, emb = self.lm_head.weight, self.embedding.weight
        if "meta" in (head.device.type, emb.device.type):  # offloaded by accelerate: no storage to compare
            return head is emb or bool(getattr(self.model.config, "tie_word_embeddings", False))
        return head.data_ptr() == emb.data_ptr()

    def attn_write(self, layer: int) -> nn.Module:
        return _get(self.layers[layer], self.family.attn_write)

    def mlp_write(self, layer: int) -> nn.Module:
        return _get(self.layers[layer], self.family.mlp_write)

    def attn_out_proj(self, layer: int) -> nn.Linear:
        return _get(self.layers[layer], self.family.attn_out_proj)

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        return _get(self.layers[layer], self.family.mlp_out_proj)

    def check_layer(self, layer: int, what: str = "layer") -> int:
        """Validate a layer index (our convention: the input of block ``layer``)."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ModelError(f"{what} {layer} is out of range: this model has layers 0..{self.n_layers - 1}")
        return layer

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device (not ``meta`` when accelerate offloads it)."""
        from refusal_atlas.model.placement import execution_device

        return execution_device(self.embedding)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype
