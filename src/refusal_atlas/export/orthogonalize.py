"""Weight orthogonalization: bake directional ablation (or any edit) into the weights and export.

Every write to the residual stream is edited so that it has no component along the directions:
the embedding rows and, in every block, the attention out-projection and the MLP down-projection
(biases too, where present). Then no residual state ever carries the directions, which is what
hook ablation enforces, so both give the same logits. That argument fails when a block rescales
its outputs before the residual add (Gemma-2's post-norms): we refuse those. Tied input/output
embeddings are untied first, so editing the embedding does not also edit the unembedding.

The edit itself lives in :class:`refusal_atlas.edits.DirectionalAblation`; this module keeps the
original entry points and adds :func:`export_edit`, which writes exactly the edit that was evaluated.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from refusal_atlas.edits import DirectionalAblation, Edit


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, directions, mode: str = "subspace") -> dict:
    """Edit ``model`` in place so its residual writes are orthogonal to ``directions``.

    Returns a small report (what was edited, whether embeddings were untied).
    """
    return DirectionalAblation(directions, mode).apply_weights(model)  # type: ignore[arg-type]


def export_edit(loaded, edit: Edit, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                force: bool = False) -> Path:
    """Apply ``edit`` to a loaded model's weights permanently and write a standalone HF model directory."""
    from refusal_atlas.model.saving import save_model_dir

    edit.apply_weights(loaded.model)
    return save_model_dir(loaded.model, loaded.tokenizer, out_dir, dtype=dtype, force=force)


def export_orthogonalized(loaded, directions, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                          force: bool = False, mode: str = "subspace") -> Path:
    """Orthogonalize a loaded model's weights and write it as a standalone HF model directory."""
    return export_edit(loaded, DirectionalAblation(directions, mode), out_dir, dtype=dtype, force=force)  # type: ignore[arg-type]


def orthogonalize_edit(directions, mode: str = "subspace"):
    """``apply_edit`` for :func:`refusal_atlas.export.formats.export_model`: orthogonalize against ``directions``."""
    return DirectionalAblation(directions, mode).apply_weights  # type: ignore[arg-type]
