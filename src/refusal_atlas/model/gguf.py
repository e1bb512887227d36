"""Read a GGUF file into a transformers model: the embedded default and any user .gguf load through here.

Kept apart from loading.py so that building the embedded cache (embedded.py) and loading a model
do not import each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from refusal_atlas.core.errors import ModelError


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """De-quantize a GGUF file with transformers' GGUF support → (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # a malformed file fails inside the GGUF reader in many ways (struct, KeyError, ...)
        raise ModelError(f"cannot load GGUF file {path}: not a valid GGUF model ({type(exc).__name__}: {exc})") from None
    return model, tokenizer
