"""Write a model and its tokenizer to a directory as safetensors, atomically.

``save_pretrained`` refuses models that came from a GGUF file (the embedded model does), so the weights
are written with our own safetensors writer, next to the config, generation config and tokenizer. The
embedded-model cache and every export format build on this. The weights written are plain de-quantized
tensors, so the config is written without the ``quantization_config`` of GGUF loading: left in, it told
every later reader (transformers, heretic, vLLM) that the folder is GGUF-quantized, and transformers then
refuses to save any model loaded from it.

The weights are streamed one tensor at a time (:func:`refusal_atlas.core.io.stream_safetensors`): each is
converted to the output dtype just before it is written and dropped after, so exporting a 15 GB model
needs 15 GB plus its largest tensor, not the second full copy a state dict for ``save_file`` would be.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from refusal_atlas.core.io import TensorEntry, atomic_dir, read_json, readable, stream_safetensors, write_json
from refusal_atlas.model.placement import full_state_dict


def _entry(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> TensorEntry:
    out = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return TensorEntry(name, tuple(tensor.shape), out, lambda: tensor.detach().to("cpu", out))


def weight_entries(model: torch.nn.Module, dtype: torch.dtype | None = None) -> list[TensorEntry]:
    """The model's tensors as :class:`TensorEntry` (values produced when written), a tied weight once."""
    entries, seen = [], set()
    tie = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in full_state_dict(model).items():  # offloaded weights read from accelerate's store
        ptr = tensor.data_ptr()
        if ptr in seen and tie:
            continue  # tied weight: from_pretrained re-ties it
        seen.add(ptr)
        entries.append(_entry(name, tensor, dtype))
    return entries


def is_gguf_quantization(quant: Any) -> bool:
    """Whether a ``quantization_config`` (dict or transformers object) is the one GGUF loading leaves."""
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def drop_gguf_quantization(config_path: Path) -> bool:
    """Rewrite a saved ``config.json`` without a GGUF ``quantization_config`` (atomically); True if it had one.

    Repairs folders written before :func:`write_model_files` dropped it (the embedded-model cache)."""
    data = read_json(config_path)
    if not is_gguf_quantization(data.get("quantization_config")):
        return False
    del data["quantization_config"]
    write_json(config_path, data)
    return True


def write_model_files(model: torch.nn.Module, tokenizer, out: Path, dtype: torch.dtype | None = None) -> None:
    """Weights (``model.safetensors``), config, generation config and tokenizer into the directory ``out``."""
    stream_safetensors(out / "model.safetensors", weight_entries(model, dtype), metadata={"format": "pt"})
    config = model.config
    if dtype is not None:
        config.dtype = dtype
    if is_gguf_quantization(getattr(config, "quantization_config", None)):
        config = copy.deepcopy(config)  # the model keeps its own config as loaded
        del config.quantization_config
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
