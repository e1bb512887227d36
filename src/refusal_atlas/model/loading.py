"""Load a chat model and its tokenizer from an HF id, a local directory, a GGUF file or the embedded default."""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refusal_atlas.core.errors import ModelError
from refusal_atlas.model.adapter import contiguous_head_input
from refusal_atlas.model.files import is_local_model
from refusal_atlas.model.gguf import load_gguf
from refusal_atlas.model.placement import describe_placement, dispatch_loaded, parse_device_map, parse_max_memory, uses_disk

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
        """Where inputs go (the embedding's execution device, also when accelerate offloads it)."""
        from refusal_atlas.model.placement import execution_device

        return execution_device(self.model.get_input_embeddings())


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU (bf16 is faster there only with AVX512-BF16 or AMX), bfloat16 on accelerators."""
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


def _from_pretrained(source: str, dtype: torch.dtype, device_map, max_memory=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement_kwargs(device_map, max_memory))
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
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    dtype_fallback: bool = True,
) -> LoadedModel:
    """Load ``spec``: ``"embedded"``, a ``.gguf`` file, a local directory or a Hugging Face id.

    ``device_map`` (auto, balanced, balanced_low_0, sequential, a JSON file or a dict) and
    ``max_memory`` (``0=20GiB,cpu=64GiB``) place the model with accelerate across GPUs, CPU and disk.
    The model is put in eval mode with gradients off for its parameters (directions are the only
    trainable tensors here). A dtype whose baseline logits are not finite is replaced by float32
    (``dtype_fallback``; recorded in ``info``) or is an error.
    """
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if max_memory is not None and device_map is None:
        raise ModelError("--max-memory needs --device-map (e.g. auto)")
    device = check_device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    info: dict = {"dtype": str(torch_dtype).removeprefix("torch."), "device": device}
    if spec == EMBEDDED:
        from refusal_atlas.model.embedded import EMBEDDED_NAME, EMBEDDED_SHA256, ensure_embedded_model

        path = ensure_embedded_model()
        model, tokenizer = _from_pretrained(str(path), torch_dtype, device_map, max_memory)
        name, source = EMBEDDED_NAME, str(path)
        info["gguf_sha256"] = EMBEDDED_SHA256
    elif spec.endswith(".gguf"):
        model, tokenizer = load_gguf(spec, torch_dtype)
        if device_map is not None:
            model = dispatch_loaded(model, device_map, max_memory, placement_kwargs(device_map, max_memory).get(
                "offload_folder"))
        name, source = Path(spec).stem, str(Path(spec).resolve())
    else:
        from refusal_atlas.model.files import check_model_dir

        if is_local_model(spec):  # a clear message for a missing, partial or truncated model directory
            check_model_dir(Path(spec).expanduser())
        model, tokenizer = _from_pretrained(str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec,
                                            torch_dtype, device_map, max_memory)
        name, source = spec.rstrip("/").split("/")[-1], spec
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    contiguous_head_input(model)
    prepare_tokenizer(tokenizer)
    info.update(describe_placement(model))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, info=info)
    return check_finite_baseline(loaded, dtype_fallback, lambda: load_model(
        spec, device=device, dtype=torch.float32, device_map=device_map, max_memory=max_memory, dtype_fallback=False))


# --- placement and dtype fallback (kept apart from the loading logic above) -----------------------
def placement_kwargs(device_map, max_memory) -> dict:
    """from_pretrained arguments for accelerate placement; a temporary offload folder when disk may be used."""
    if device_map is None:
        return {}
    kwargs: dict = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if uses_disk(device_map, max_memory):
        folder = tempfile.mkdtemp(prefix="refusal-atlas-offload-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        kwargs["offload_folder"] = folder
    return kwargs


BASELINE_PROBES = ("Hello, how are you?", "Write a short poem about the sea.", "What is 17 times 23?")


@torch.inference_mode()
def baseline_is_finite(loaded: LoadedModel) -> bool:
    """One forward pass on a few plain prompts: are all logits finite in this dtype?"""
    from refusal_atlas.model.placement import execution_device

    model, tok = loaded.model, loaded.tokenizer
    batch = tok(list(BASELINE_PROBES), return_tensors="pt", padding=True)
    device = execution_device(model.get_input_embeddings())
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return bool(torch.isfinite(logits).all())


def check_finite_baseline(loaded: LoadedModel, allow_fallback: bool, reload_float32) -> LoadedModel:
    """Keep ``loaded`` if its baseline is finite; else reload in float32 (recorded) or raise."""
    if loaded.info["dtype"] == "float32" or baseline_is_finite(loaded):
        return loaded
    dtype = loaded.info["dtype"]
    if not allow_fallback:
        raise ModelError(f"{loaded.name} in {dtype} gives non-finite (NaN/inf) logits on plain prompts; "
                         "use --dtype float32 (or bfloat16), or allow the float32 fallback")
    log.warning("%s in %s gives non-finite logits on plain prompts; reloading in float32", loaded.name, dtype)
    del loaded
    fallback = reload_float32()
    fallback.info["dtype_fallback"] = {"requested": dtype, "used": "float32",
                                       "reason": "non-finite baseline logits on plain prompts"}
    return fallback
