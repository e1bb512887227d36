"""A run directory holds everything a run made, so any step can resume or be re-reported.

Layout: manifest.json, activations.safetensors, directions/*.safetensors, selection.json,
completions/*.jsonl, metrics.json, plots/, report.html. All writes are atomic.
"""

from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path
from typing import Any

from refusal_atlas import __version__
from refusal_atlas.core.errors import ArtifactError
from refusal_atlas.core.io import read_json, write_json


class RunDir:
    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise ArtifactError(f"run directory not found: {self.path}")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def direction_path(self, name: str) -> Path:
        return self.path / "directions" / f"{name}.safetensors"

    def completions_path(self, dataset: str, intervention: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in intervention)
        return self.path / "completions" / f"{_file_stem(dataset)}__{safe}.jsonl"

    # manifest -----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path) if self.manifest_path.exists() else {}

    def init_manifest(self, config: dict[str, Any], model_info: dict[str, Any]) -> None:
        import torch
        import transformers

        old = self.manifest()
        manifest = {
            "refusal_atlas": __version__,
            "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "config": config,
            "model": model_info,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "timings_s": old.get("timings_s", {}),
            "status": "running",
        }
        write_json(self.manifest_path, manifest)

    def replace_manifest(self, **fields: Any) -> None:
        """Set top-level manifest entries whole (``update_manifest`` merges dicts one level deep)."""
        write_json(self.manifest_path, {**self.manifest(), **fields})

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest()
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        write_json(self.manifest_path, manifest)

    # metrics ------------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        data = read_json(self.metrics_path)
        if not isinstance(data, list):
            raise ArtifactError(f"{self.metrics_path} must hold a list of records")
        return data

    def add_metrics(self, records: list[dict[str, Any]]) -> None:
        """Append records, replacing earlier ones with the same identity (re-running a step)."""
        new_ids = {_identity(r) for r in records}
        kept = [r for r in self.metrics() if _identity(r) not in new_ids]
        write_json(self.metrics_path, kept + list(records))


def recorded_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's recorded settings by name (``n_train``, ``seed``, ...): manifests hold them in sections
    (``{"model": {...}, "data": {...}, ...}``, see refusal_atlas.settings), older ones flat."""
    config = manifest.get("config") or {}
    if isinstance(config.get("model"), dict):  # sections; the flat form's `model` is the model's name
        return {name: value for table in config.values() if isinstance(table, dict) for name, value in table.items()}
    return dict(config)


def _identity(record: dict[str, Any]) -> tuple:
    """What a record measured: a rerun with another prompt count or length is another record.

    The prompt count is ``n + unclear`` (judged rates count only decided items in ``n``).
    """
    keys = ("intervention", "fingerprint", "dataset", "judge", "metric", "max_new_tokens")
    return (*(record.get(k) for k in keys), (record.get("n") or 0) + (record.get("unclear") or 0))


def _file_stem(dataset: str) -> str:
    """A registered name as is; a prompt file path → its stem + a hash of the path (stays inside the run)."""
    if all(c.isalnum() or c in "-_" for c in dataset):
        return dataset
    digest = hashlib.sha256(str(Path(dataset).expanduser().absolute()).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(dataset).stem) or "prompts"
    return f"{stem}-{digest}"
