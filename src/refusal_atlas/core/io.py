"""Atomic artifact writes: a crash never leaves a half-written file behind.

Everything goes to a temporary file in the destination folder and is renamed into place, which is
atomic on POSIX file systems. Artifacts are JSON or safetensors, never pickle. A write that runs out of
disk removes its temporary file or directory and raises one :class:`ArtifactError` (the CLI prints one
``error:`` line), whatever library was writing. :func:`stream_safetensors` writes a model-sized file one
tensor at a time, so writing never needs a second copy of the weights in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.core.resources import disk_full_error, is_disk_full


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temp file/dir ordinary permissions (mkstemp/mkdtemp make them private: 0600/0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        readable(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise
    return path


def check_output_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output path that already holds something, unless ``force`` says to replace it.

    Called before any work, so a mistyped ``--out`` never costs a model load, and never a user's data.
    """
    out = Path(path)
    if out.is_file() or out.is_symlink():
        raise ConfigError(f"output path {out} is an existing file; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"output directory {out} is not empty; choose another path or pass --force to replace it")
    return out


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty sibling temp directory that becomes ``path`` only when the block succeeds.

    Readers see the old directory or the complete new one, never a half-written one; on an error
    the temp directory is removed and ``path`` is left as it was. An existing non-empty ``path`` is
    an error unless ``force``; then it is replaced only after the new one is complete.
    """
    out = check_output_dir(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            yield tmp
        except BaseException as exc:
            if is_disk_full(exc):
                raise disk_full_error(out) from None
            raise
        readable(tmp, directory=True)
        check_output_dir(out, force)  # it may have appeared while we worked
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")

    return _atomic(Path(path), write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return _atomic(Path(path), write)


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a missing or corrupt file into an :class:`ArtifactError`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt JSON in {path}: {exc}") from None


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save tensors as safetensors, atomically; ``metadata`` is stored as one JSON string."""
    meta = {"json": json.dumps(metadata, default=_json_default)} if metadata is not None else None
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata=meta))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors` → (tensors, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("json")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"corrupt safetensors file {path}: {exc}") from None
    return tensors, (json.loads(raw) if raw else {})


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a streamed file: its name, shape and dtype now, its values only when ``get()`` is called."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]


def stream_safetensors(path: str | os.PathLike, entries: Sequence[TensorEntry],
                       metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file tensor by tensor (not atomically: call it inside :func:`atomic_dir`).

    The header is built from the shapes alone; then each tensor is produced, written and dropped, so the
    memory this needs is one tensor (in its output dtype), not the whole state dict that
    ``safetensors.torch.save_file`` takes. Tensors are laid out by descending element size, then name, as
    the safetensors library does, so every tensor starts aligned to its element size.
    """
    order = sorted(entries, key=lambda e: (-torch.empty((), dtype=e.dtype).element_size(), e.name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in order:
        if e.dtype not in _SAFETENSORS_DTYPES:
            raise ArtifactError(f"cannot write {e.name} of dtype {e.dtype} as safetensors")
        size = torch.Size(e.shape).numel() * torch.empty((), dtype=e.dtype).element_size()
        header[e.name] = {"dtype": _SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for e in order:
            t = e.get().detach()
            if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                raise ArtifactError(f"{e.name}: produced {t.dtype} {tuple(t.shape)}, announced {e.dtype} {e.shape}")
            t = t.to("cpu").contiguous()
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    return path


def append_jsonl(path: str | os.PathLike, records: list[Mapping[str, Any]]) -> None:
    """Append records to a JSONL file, one flushed line each (safe to resume after a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (model weights, labelled sets)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def vectors_fingerprint(vectors: torch.Tensor, ids: list[int], layer: int) -> str:
    """16 hex chars of sha256 over the float32 vector bytes, ids and layer: which artifact made a result.

    Here, below both, so a DirectionSet and an intervention on a bare tensor hash the same way.
    """
    data = vectors.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data + repr((ids, layer)).encode()).hexdigest()[:16]
