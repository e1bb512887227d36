"""Write a model directory (safetensors + config + tokenizer) that ``from_pretrained`` reloads.

``save_pretrained`` refuses models that came from a GGUF file, so we write the state dict
ourselves. The directory is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from refusal_atlas.io import atomic_dir
from refusal_atlas.model.placement import full_state_dict


def save_model_dir(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                   force: bool = False) -> Path:
    """Save ``model`` (weights, config, generation config) and ``tokenizer`` to ``out_dir`` atomically.

    A non-empty ``out_dir`` is an error unless ``force`` (then it is replaced once the new one is complete).
    """
    with atomic_dir(out_dir, force=force) as tmp:
        state: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, tensor in full_state_dict(model).items():  # offloaded weights read from accelerate's store
            ptr = tensor.data_ptr()
            if ptr in seen and getattr(model.config, "tie_word_embeddings", False):
                continue  # tied weight: from_pretrained re-ties it
            seen[ptr] = name
            t = tensor.detach().to("cpu")
            state[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous().clone()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
