"""Full directional ablation baked into the weights of a model that accelerate partly offloads.

Offloaded weights are ``meta`` placeholders whose values live in accelerate's weights map, so the
in-place edits of :mod:`refusal_atlas.edits.writes` cannot reach them; here every edited tensor is
read from (and written back to) that map through :func:`refusal_atlas.model.placement.editable_tensor`.
Only the permanent edit (export) is offered: restoring offloaded weights is not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refusal_atlas.core.errors import ModelError
from refusal_atlas.edits.projection import orthonormal_basis
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.placement import editable_tensor


@torch.no_grad()
def orthogonalize_offloaded(adapter: ModelAdapter, vectors: torch.Tensor) -> dict[str, Any]:
    """Remove span(vectors) from the embedding and every o_proj/down_proj (and biases), in float32."""
    if adapter.embeddings_tied:
        raise ModelError("this model ties its input and output embeddings and accelerate offloads weights; "
                         "untying offloaded embeddings is not supported: place the model without offload")
    if any(adapter.is_moe(layer) for layer in range(adapter.n_layers)):
        raise ModelError("weight edits of offloaded mixture-of-experts models are not supported; "
                         "place the model without offload")
    basis = orthonormal_basis(vectors.to(torch.float64))

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
    return {"rank": int(basis.shape[0]), "mode": "subspace", "untied_embeddings": False,
            "layers": adapter.n_layers, "offloaded": True}
