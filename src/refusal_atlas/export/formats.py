"""Export an edited model: safetensors directory, PEFT LoRA adapter or GGUF file, written atomically.

``export_model`` takes a loaded model and a callable that edits it in place (any edit that has a
weight form), so a new edit exports in every format for free. Every output is a directory built under
a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import atomic_dir, readable
from refusal_atlas.model.saving import write_model_files

FORMATS = ("safetensors", "lora", "gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_NAME = "model.gguf"


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
        from refusal_atlas.export.gguf import check_gguf_request

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
        from refusal_atlas.export.gguf import check_gguf_config, check_gguf_request

        check_gguf_request(model.config.model_type, quant or "f16")
        check_gguf_config(model.config)
    with atomic_dir(out, force=force) as tmp:
        summary: dict = {"format": fmt}
        if fmt == "lora":
            from refusal_atlas.export.lora import snapshot, write_lora

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
                from refusal_atlas.export.gguf import write_gguf

                write_gguf(model, tokenizer, tmp / GGUF_NAME, quant or "f16", name=loaded.name)
                summary["quant"] = quant or "f16"
        if extras is not None:
            extras(tmp, summary)
        for path in tmp.rglob("*"):  # some writers (safetensors) create private 0600 files
            readable(path, directory=path.is_dir())
    summary["path"] = str(out)
    return summary
