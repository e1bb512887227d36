"""Export an edited model: safetensors directory, PEFT LoRA adapter or GGUF file, written atomically.

``export_model`` takes a loaded model and a callable that edits it in place (any edit that can be
expressed as weights: orthogonalization today), so new edits export in every format for free.
``save_pretrained`` refuses models that came from a GGUF file, so we write the state dict ourselves.
Every output is a directory built under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from refusal_atlas.errors import ConfigError
from refusal_atlas.io import atomic_dir, readable
from refusal_atlas.model.placement import full_state_dict

FORMATS = ("safetensors", "lora", "gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_NAME = "model.gguf"


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


def original_dtype(source: str) -> torch.dtype:
    """The dtype the source checkpoint records in its config.

    A GGUF source (the embedded model is a Q4_K_M GGUF) has none: its de-quantized weights are exact
    only in float32, so that is its "original" dtype, and the embedded cache records float32 too.
    """
    if str(source).endswith(".gguf"):
        return torch.float32
    try:
        from transformers import AutoConfig

        dtype = getattr(AutoConfig.from_pretrained(source), "dtype", None)
    except (OSError, ValueError):
        return torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def check_export_request(fmt: str, quant: str | None, dtype: str | None) -> None:
    """Validate format options before a model is loaded."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quant is not None and fmt != "gguf":
        raise ConfigError("--quant applies to --format gguf only")
    if fmt == "gguf":
        from refusal_atlas.model.export_gguf import check_gguf_request

        check_gguf_request(None, quant or "f16")
    if dtype is not None and (fmt != "safetensors" or dtype not in DTYPES):
        raise ConfigError(f"--dtype applies to --format safetensors and is one of {', '.join(DTYPES)}")


def export_model(loaded, apply_edit: Callable[[torch.nn.Module], dict], out: str | os.PathLike, fmt: str = "safetensors",
                 *, quant: str | None = None, dtype: str | None = None, base_model: str | None = None,
                 force: bool = False, extras: Callable[[Path, dict], None] | None = None) -> dict:
    """Edit ``loaded.model`` in place with ``apply_edit`` and write it to the directory ``out`` as ``fmt``.

    ``extras(tmp_dir, summary)`` adds files (the reproducibility bundle) before the directory is
    renamed into place. Returns a summary: format, files written, the edit's report.
    """
    check_export_request(fmt, quant, dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if fmt == "gguf":
        from refusal_atlas.model.export_gguf import check_gguf_request

        check_gguf_request(model.config.model_type, quant or "f16")
    with atomic_dir(out, force=force) as tmp:
        summary: dict = {"format": fmt}
        if fmt == "lora":
            from refusal_atlas.model.export_lora import snapshot, write_lora

            before = snapshot(model)
            summary["edit"] = apply_edit(model)
            summary["lora"] = write_lora(before, model, tmp, base_model=base_model or loaded.source)
            del before
        else:
            summary["edit"] = apply_edit(model)
            if fmt == "safetensors":
                chosen = DTYPES[dtype] if dtype else original_dtype(loaded.source)
                write_model_files(model, tokenizer, tmp, chosen)
                summary["dtype"] = str(chosen).removeprefix("torch.")
            else:
                from refusal_atlas.model.export_gguf import write_gguf

                write_gguf(model, tokenizer, tmp / GGUF_NAME, quant or "f16", name=loaded.name)
                summary["quant"] = quant or "f16"
        if extras is not None:
            extras(tmp, summary)
        for path in tmp.rglob("*"):  # some writers (safetensors) create private 0600 files
            readable(path, directory=path.is_dir())
    summary["path"] = str(out)
    return summary
