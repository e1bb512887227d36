"""Where the residual stream is, for each supported architecture.

Interventions and extraction never poke at model attributes directly: they ask the adapter for
the decoder blocks, the modules whose outputs are *added to the residual stream* (the residual
"writes"), the embedding, and the weight matrices that write along d_model. Gemma-2/3 rescale
attention and MLP outputs with post-norms before the residual add, so their writes are the
post-norm modules, and weight orthogonalization is not equivalent to hook ablation for them.

Mixture-of-experts blocks (Qwen2-MoE, Qwen3-MoE, Mixtral) write the sparse block's output: a
router-weighted sum of expert outputs (plus Qwen2-MoE's sigmoid-gated shared expert), each a
down-projection's output times a per-token scalar. So their residual write is the MoE block, and
the weights that write along d_model are every expert's down-projection (fused 3-D parameters in
transformers 5, one Linear per expert in older layouts) and the shared expert's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from refusal_atlas.core.errors import ModelError
from refusal_atlas.model.hooks import hook_inputs


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
    "qwen2_moe": _STANDARD,  # layers listed in mlp_only_layers keep a dense mlp.down_proj
    "qwen3_moe": _STANDARD,
    "mixtral": _STANDARD,
}


@dataclass
class WriteWeight:
    """A weight that writes along d_model: ``weight``'s axis ``d_axis`` is d_model (``bias`` [..., d] or None).

    ``weight`` is ``getattr(owner, attr)`` (a Linear's ``weight``, fused experts' ``down_proj``): what a
    hook-form edit reparametrizes without touching the stored tensor."""

    name: str
    weight: torch.Tensor
    d_axis: int
    bias: torch.Tensor | None = field(default=None)
    owner: nn.Module | None = field(default=None)
    attr: str = "weight"


def _linear_write(name: str, linear: nn.Module) -> WriteWeight:
    return WriteWeight(name, linear.weight, 0, linear.bias, linear)


def _expert_writes(prefix: str, experts: nn.Module, d_model: int) -> list[WriteWeight]:
    """Down-projections of a block's experts, fused ([E, d, inter] or transposed [E, inter, d]) or per expert."""
    if isinstance(experts, nn.ModuleList):
        out = []
        for i, expert in enumerate(experts):
            attr = "down_proj" if hasattr(expert, "down_proj") else "w2" if hasattr(expert, "w2") else None
            if attr is None:
                raise ModelError(f"expert {prefix}.{i} ({type(expert).__name__}) has no down_proj/w2 projection")
            out.append(_linear_write(f"{prefix}.{i}.{attr}", getattr(expert, attr)))
        return out
    weight = getattr(experts, "down_proj", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 3:
        raise ModelError(f"cannot find the experts' down-projection in {prefix} ({type(experts).__name__})")
    d_axis = 2 if getattr(experts, "is_transposed", False) else 1
    if weight.shape[d_axis] != d_model:
        raise ModelError(f"{prefix}.down_proj has shape {tuple(weight.shape)}; expected d_model={d_model} on axis {d_axis}")
    return [WriteWeight(f"{prefix}.down_proj", weight, d_axis, getattr(experts, "down_proj_bias", None), experts,
                        "down_proj")]


def _contiguous(x: torch.Tensor) -> torch.Tensor | None:
    return x.contiguous() if isinstance(x, torch.Tensor) else None


def contiguous_head_input(model: nn.Module) -> None:
    """Make the LM head's input contiguous (once per model).

    ``logits_to_keep=1`` hands the head a strided slice of the last hidden states. On CPU torch's
    Linear is 2.7x slower on that slice in float32 and about 500x slower in bfloat16 (18 s against
    35 ms for 16 rows of a 152k vocabulary). A contiguous copy of one position per row costs nothing.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module) and not getattr(head, "_refusal_atlas_contiguous", False):
        hook_inputs(head, _contiguous)  # for the model's lifetime: never removed
        head._refusal_atlas_contiguous = True


def float32_head_output(model: nn.Module) -> None:
    """Compute the LM head in float32 when the model runs in a lower precision (once per model).

    bf16 logits of magnitude 16-32 are rounded to steps of 0.125, which puts a floor of about 0.001
    under the next-token KL of any edit (median +0.0010 against float32 over 10 edits). A float32 head
    (one position per row, the float32 weight cached until it is edited) brings that to +0.0003, for
    about 2 s of a 16.6 s trial on the embedded model (bench/trial_cost.py --compare, docs/search.md).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.weight.dtype == torch.float32 or getattr(head, "_refusal_atlas_fp32", False):
        return
    if getattr(head, "_hf_hook", None) is not None:  # accelerate placed it and owns its forward: keep that
        return
    cache: dict = {}

    def forward(x: torch.Tensor) -> torch.Tensor:  # replaces Linear.forward on this instance; hooks still run
        w = head.weight
        key = (w.data_ptr(), w._version)
        if cache.get("key") != key:  # an in-place edit of a tied embedding bumps the version
            cache.update(key=key, w=w.detach().float(), b=None if head.bias is None else head.bias.detach().float())
        return torch.nn.functional.linear(x.float(), cache["w"], cache["b"])

    head.forward = forward
    head._refusal_atlas_fp32 = True


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
        contiguous_head_input(model)

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

    def is_moe(self, layer: int) -> bool:
        return hasattr(self.mlp_write(layer), "experts")

    def attn_write_weights(self, layer: int) -> list[WriteWeight]:
        """The weight of block ``layer``'s attention that writes along d_model (its out-projection)."""
        return [_linear_write(self.family.attn_out_proj, self.attn_out_proj(layer))]

    def mlp_write_weights(self, layer: int) -> list[WriteWeight]:
        """Every weight of block ``layer``'s MLP (dense or mixture of experts) that writes along d_model."""
        if not self.is_moe(layer):
            return [_linear_write(self.family.mlp_out_proj, self.mlp_out_proj(layer))]
        block = self.mlp_write(layer)
        out = _expert_writes(f"{self.family.mlp_write}.experts", block.experts, self.d_model)
        if getattr(block, "shared_expert", None) is not None:  # Qwen2-MoE: gated by a per-token scalar
            out.append(_linear_write(f"{self.family.mlp_write}.shared_expert.down_proj", block.shared_expert.down_proj))
        return out

    def router(self, layer: int) -> nn.Module:
        """Block ``layer``'s router: the module (``gate``) whose ``weight`` [E, d_model] turns the block's input
        into one logit per expert (a Linear, or transformers 5's top-k router that also picks the experts)."""
        gate = getattr(self.mlp_write(layer), "gate", None) if self.is_moe(layer) else None
        weight = getattr(gate, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != self.d_model:
            raise ModelError(f"block {layer} has no mixture-of-experts router with a [n_experts, d_model] weight")
        return gate

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
