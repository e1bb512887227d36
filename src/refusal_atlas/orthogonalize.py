"""Weight orthogonalization: bake directional ablation into the weights and export the model.

Every write to the residual stream is edited so that it has no component along the directions:
the embedding rows and, in every block, the attention out-projection and the MLP down-projection
(biases too, where present). Then no residual state ever carries the directions, which is what
hook ablation enforces, so both give the same logits. That argument fails when a block rescales
its outputs before the residual add (Gemma-2's post-norms): we refuse those. Tied input/output
embeddings are untied first, so editing the embedding does not also edit the unembedding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from refusal_atlas.errors import ModelError
from refusal_atlas.interventions import as_matrix, orthonormal_basis
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.placement import editable_tensor, is_offloaded


def _untie_embeddings(adapter: ModelAdapter) -> bool:
    if not adapter.embeddings_tied:
        return False
    adapter.model.lm_head.weight = nn.Parameter(adapter.embedding.weight.detach().clone(), requires_grad=False)
    adapter.model.config.tie_word_embeddings = False
    if hasattr(adapter.model.config, "get_text_config"):
        adapter.model.config.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, directions) -> dict:
    """Edit ``model`` in place so its residual writes are orthogonal to ``directions``.

    Returns a small report (what was edited, whether embeddings were untied).
    """
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
    if adapter.has_post_norms:
        raise ModelError(
            f"{adapter.model_type} rescales attention/MLP outputs with post-norms before the residual add, "
            "so orthogonalized weights would not match hook ablation; use hook ablation for this model"
        )
    basis = orthonormal_basis(as_matrix(directions).to(torch.float64))
    if adapter.embeddings_tied and is_offloaded(adapter.model):
        raise ModelError("this model ties its input and output embeddings and accelerate offloads weights; "
                         "untying offloaded embeddings is not supported: place the model without offload")
    untied = _untie_embeddings(adapter)

    # computed in float32 (at least) and rounded once, whatever the model dtype; offloaded weights
    # (accelerate's meta placeholders) are edited in its weights map
    def edit(module: nn.Module, attr: str, rows: bool) -> None:
        with editable_tensor(adapter.model, module, attr) as weight:
            view = weight.unsqueeze(0) if weight.ndim == 1 else weight
            work = torch.promote_types(view.dtype, torch.float32)
            w, b = view.to(work), basis.to(device=view.device, dtype=work)
            view.copy_(w - (w @ b.T) @ b if rows else w - b.T @ (b @ w))  # rows: [*, d]; cols: Linear [d, *]

    edit(adapter.embedding, "weight", rows=True)
    for layer in range(adapter.n_layers):
        for proj in (adapter.attn_out_proj(layer), adapter.mlp_out_proj(layer)):
            edit(proj, "weight", rows=False)
            if proj.bias is not None:
                edit(proj, "bias", rows=True)
    return {"rank": int(basis.shape[0]), "untied_embeddings": untied, "layers": adapter.n_layers}


def export_orthogonalized(loaded, directions, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                          force: bool = False) -> Path:
    """Orthogonalize a loaded model's weights and write it as a standalone HF model directory."""
    from refusal_atlas.model.export import save_model_dir

    orthogonalize_weights(loaded.model, directions)
    return save_model_dir(loaded.model, loaded.tokenizer, out_dir, dtype=dtype, force=force)
