"""Load a chat model and its tokenizer from an HF id, a local directory, a GGUF file or the embedded default."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refusal_atlas.errors import ModelError

EMBEDDED = "embedded"
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer, and where it came from (recorded in run manifests)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slower on common CPUs), bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """A device string torch understands and this machine has (``cuda`` needs a visible GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"invalid device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device {device!r} requested but no CUDA GPU is available "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ModelError(f"device {device!r} requested but only {count} CUDA GPU(s) are visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(f"device {device!r} requested but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ModelError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return device


def prepare_tokenizer(tokenizer) -> None:
    """Left padding always (post-instruction positions are then the last tokens); pad = eos if absent."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token


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


def _from_pretrained(source: str, dtype: torch.dtype, device_map: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"cannot load model {source!r}: {msg}. Pass a Hugging Face id (with network or a populated "
            "cache), a local model directory, a .gguf file, or 'embedded'."
        ) from None
    return model, tokenizer


def load_model(
    spec: str = EMBEDDED,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load ``spec``: ``"embedded"``, a ``.gguf`` file, a local directory or a Hugging Face id.

    ``device_map="auto"`` shards large models across GPUs with accelerate. The model is put in eval
    mode with gradients off for its parameters (directions are the only trainable tensors here).
    """
    device = check_device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    info: dict = {"dtype": str(torch_dtype).removeprefix("torch."), "device": device}
    if spec == EMBEDDED:
        from refusal_atlas.model.embedded import EMBEDDED_NAME, EMBEDDED_SHA256, ensure_embedded_model

        path = ensure_embedded_model()
        model, tokenizer = _from_pretrained(str(path), torch_dtype, None)
        name, source = EMBEDDED_NAME, str(path)
        info["gguf_sha256"] = EMBEDDED_SHA256
    elif spec.endswith(".gguf"):
        model, tokenizer = load_gguf(spec, torch_dtype)
        name, source = Path(spec).stem, str(Path(spec).resolve())
    else:
        from refusal_atlas.validate import check_model_dir, is_local_model

        if is_local_model(spec):  # a clear message for a missing, partial or truncated model directory
            check_model_dir(Path(spec).expanduser())
        model, tokenizer = _from_pretrained(str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec,
                                            torch_dtype, device_map)
        name, source = spec.rstrip("/").split("/")[-1], spec
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, info=info)
