"""What a model's files say, read without loading weights: config, tokenizer, weight headers.

Used before any model load (``refusal_atlas.workflows.validate``), so a directory that is not a model, a
truncated safetensors file or a damaged GGUF file costs milliseconds and one clear error instead
of a traceback from deep inside transformers. Only headers are read, never tensor data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from refusal_atlas.core.errors import ModelError


@dataclass(frozen=True)
class ModelFacts:
    """What a model's files say about it, read without loading weights."""

    model_type: str | None
    n_layers: int | None
    d_model: int | None
    has_chat_template: bool | None = None
    n_experts: int | None = None  # routed experts per MoE block; 0: a dense model; None: not known


EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # config.json names of the expert count


def _n_experts(config: dict[str, Any]) -> int:
    return max([_int(config.get(k)) or 0 for k in EXPERT_KEYS])


def check_model_dir(path: Path) -> ModelFacts:
    if not path.exists():
        raise ModelError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ModelError(f"model path {path} is a file; pass a model directory, a .gguf file or a Hugging Face id")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path} is not a model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_path} must hold a JSON object")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if not any((path / f).is_file() for f in tokenizer_files):
        raise ModelError(f"{path} has no tokenizer ({', '.join(tokenizer_files)}); save the tokenizer with the model")
    _check_weights(path)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return ModelFacts(config.get("model_type"), _int(text.get("num_hidden_layers")), _int(text.get("hidden_size")),
                      _has_template(path), _n_experts(text))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _has_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return bool(isinstance(tok_cfg, dict) and tok_cfg.get("chat_template"))


def _check_weights(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index} is not a valid safetensors index") from None
        for shard in shards:
            if not (path / shard).is_file():
                raise ModelError(f"{path}: shard {shard} listed in model.safetensors.index.json is missing")
            safetensors_header(path / shard, ModelError)
        return
    files = sorted(path.glob("*.safetensors"))
    if files:
        for f in files:
            safetensors_header(f, ModelError)
        return
    if not any(path.glob("pytorch_model*.bin")):
        raise ModelError(f"{path} has no weights (model.safetensors); not a complete model directory")


def safetensors_header(path: Path, error: type[Exception] = ModelError) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file size (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise error(f"{path} is not a valid safetensors file ({exc})") from None
    if 8 + n + end != size:
        raise error(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}")
    return header


# GGUF: value type → struct format (fixed-size scalars); 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = fh.read(size)
    if len(data) < size:
        raise ValueError("the file ends inside its header")
    return struct.unpack("<" + fmt, data)[0]


def _gguf_string(fh: BinaryIO) -> bytes:
    n = _read(fh, "Q")
    if n > 1 << 30:
        raise ValueError(f"string length {n} is implausible")
    data = fh.read(n)
    if len(data) < n:
        raise ValueError("the file ends inside its header")
    return data


def _gguf_value(fh: BinaryIO, kind: int) -> Any:
    if kind in _GGUF_SCALARS:
        return _read(fh, _GGUF_SCALARS[kind])
    if kind == 8:
        return _gguf_string(fh)
    if kind == 9:
        item, count = _read(fh, "I"), _read(fh, "Q")
        if item in _GGUF_SCALARS:  # skip fixed-size arrays without parsing them
            fh.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), 1)
        else:
            for _ in range(count):
                _gguf_value(fh, item)
        return None
    raise ValueError(f"unknown metadata value type {kind}")


def check_gguf(path: Path) -> ModelFacts:
    """Magic, metadata and tensor extents of a GGUF file (the header only: a truncated file fails here)."""
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"cannot load GGUF file {path}: not a valid GGUF model (no GGUF header)")
            version, n_tensors, n_kv = _read(fh, "I"), _read(fh, "Q"), _read(fh, "Q")
            if version not in (2, 3) or n_tensors > 1_000_000 or n_kv > 1_000_000:
                raise ValueError(f"implausible header (version {version}, {n_tensors} tensors, {n_kv} keys)")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _gguf_string(fh).decode("utf-8", "replace")
                meta[key] = _gguf_value(fh, _read(fh, "I"))
            extents = []
            for _ in range(n_tensors):
                _gguf_string(fh)
                dims = [_read(fh, "Q") for _ in range(_read(fh, "I"))]
                extents.append((dims, _read(fh, "I"), _read(fh, "Q")))
            align = meta.get("general.alignment") or 32
            start = -(-fh.tell() // align) * align
        _check_gguf_extents(extents, start, size)
    except ModelError:
        raise
    except (ValueError, struct.error, OSError) as exc:
        raise ModelError(f"cannot load GGUF file {path}: not a valid GGUF model ({exc})") from None
    arch = meta.get("general.architecture")
    arch = arch.decode("utf-8", "replace") if isinstance(arch, bytes) else None
    return ModelFacts(arch, _int(meta.get(f"{arch}.block_count")), _int(meta.get(f"{arch}.embedding_length")),
                      "tokenizer.chat_template" in meta, _int(meta.get(f"{arch}.expert_count")) or 0)


def _check_gguf_extents(extents: list[tuple[list[int], int, int]], start: int, size: int) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    end = start
    for dims, kind, offset in extents:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ValueError(f"unknown tensor type {kind}") from None
        count = 1
        for d in dims:
            count *= d
        end = max(end, start + offset + count // block * type_size)
    if end > size:
        raise ValueError(f"truncated: the tensors need {end} bytes, the file has {size}")


def is_local_model(spec: str) -> bool:
    """A path on disk (a .gguf file, a relative, absolute or home path, or anything that exists), not a Hugging Face id."""
    return spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()
