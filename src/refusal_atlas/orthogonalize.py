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
from refusal_atlas.model.adapter import ModelAdapter, WriteWeight


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
    untied = _untie_embeddings(adapter)

    # computed in float32 (at least) and rounded once, whatever the model dtype
    def edit_rows(weight: torch.Tensor) -> None:  # [*, d_model]: remove components along the basis
        work = torch.promote_types(weight.dtype, torch.float32)
        w, b = weight.to(work), basis.to(device=weight.device, dtype=work)
        weight.copy_(w - (w @ b.T) @ b)

    def edit_cols(weight: torch.Tensor) -> None:  # [d_model, *] Linear weight writing along d_model
        work = torch.promote_types(weight.dtype, torch.float32)
        w, b = weight.to(work), basis.to(device=weight.device, dtype=work)
        weight.copy_(w - b.T @ (b @ w))

    edit_rows(adapter.embedding.weight)
    edited = 0
    for layer in range(adapter.n_layers):
        proj = adapter.attn_out_proj(layer)
        edit_cols(proj.weight)
        if proj.bias is not None:
            edit_rows(proj.bias.unsqueeze(0))
        for write in adapter.mlp_write_weights(layer):
            edit_write_weight(write, basis)
            edited += 1
    return {"rank": int(basis.shape[0]), "untied_embeddings": untied, "layers": adapter.n_layers,
            "mlp_weights": edited, "moe_layers": sum(adapter.is_moe(l) for l in range(adapter.n_layers))}


def edit_write_weight(write: WriteWeight, basis: torch.Tensor) -> None:
    """Remove span(basis) from what one MLP weight writes: dense down_proj, fused [E, ...] experts or shared expert.

    The d_model axis (``write.d_axis``) is moved last, projected like embedding rows, and moved back,
    so the fused 3-D expert layouts ([E, d, inter] and transposed [E, inter, d]) need no special case.
    """
    weight = write.weight
    work = torch.promote_types(weight.dtype, torch.float32)
    b = basis.to(device=weight.device, dtype=work)
    w = weight.to(work).movedim(write.d_axis, -1)
    weight.copy_((w - (w @ b.T) @ b).movedim(-1, write.d_axis))
    if write.bias is not None:
        bias = write.bias.to(work)
        write.bias.copy_(bias - (bias @ b.T) @ b)


def export_orthogonalized(loaded, directions, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                          force: bool = False) -> Path:
    """Orthogonalize a loaded model's weights and write it as a standalone HF model directory."""
    from refusal_atlas.model.export import save_model_dir

    orthogonalize_weights(loaded.model, directions)
    return save_model_dir(loaded.model, loaded.tokenizer, out_dir, dtype=dtype, force=force)


def orthogonalize_edit(directions):
    """``apply_edit`` for :func:`refusal_atlas.model.export.export_model`: orthogonalize against ``directions``."""
    return lambda model: orthogonalize_weights(model, directions)
