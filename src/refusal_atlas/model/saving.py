"""Write a model and its tokenizer to a directory as safetensors, atomically.

``save_pretrained`` refuses models that came from a GGUF file (the embedded model does), so the state
dict is written with safetensors directly, next to the config, generation config and tokenizer. The
embedded-model cache and every export format build on this.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from refusal_atlas.core.io import atomic_dir, readable
from refusal_atlas.model.placement import full_state_dict

def write_model_files(model: torch.nn.Module, tokenizer, out: Path, dtype: torch.dtype | None = None) -> None:
    """Weights (``model.safetensors``), config, generation config and tokenizer into the directory ``out``."""
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in full_state_dict(model).items():  # offloaded weights read from accelerate's store
        ptr = tensor.data_ptr()
        if ptr in seen and getattr(model.config, "tie_word_embeddings", False):
            continue  # tied weight: from_pretrained re-ties it
        seen[ptr] = name
        t = tensor.detach().to("cpu")
        state[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_model_dir(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                   force: bool = False) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out_dir`` atomically (non-empty ``out_dir`` needs ``force``)."""
    with atomic_dir(out_dir, force=force) as tmp:
        write_model_files(model, tokenizer, tmp, dtype)
        for path in tmp.rglob("*"):
            readable(path, directory=path.is_dir())
    return Path(out_dir)
