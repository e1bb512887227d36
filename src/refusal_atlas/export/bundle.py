"""Export from a run directory with a reproducibility bundle, and verify an export against it.

Beside the model, ``OUT/reproduce/`` holds the run's config and model info, the edit (its kind,
parameters and direction file), how the model was loaded and exported, package versions, sha256 of
the source model's files, and ``files.json``: sha256 of every file written. ``verify`` re-hashes
those files; ``verify --rerun`` loads the source model again, re-applies the edit, re-exports into
a temporary directory and compares every model file byte for byte.
"""

from __future__ import annotations

import importlib.metadata
import platform
import tempfile
from pathlib import Path

from refusal_atlas.core.errors import ArtifactError
from refusal_atlas.core.io import read_json, sha256_file, write_json

BUNDLE = "reproduce"
PACKAGES = ("refusal-atlas", "torch", "transformers", "safetensors", "gguf", "peft", "numpy", "tokenizers")


def hash_tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (relative POSIX paths), except ``skip``."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


def source_hashes(source: str) -> dict:
    """Hashes of the source model's files: a .gguf file, a local directory, or the HF cache snapshot."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"path": str(path), "files": {path.name: sha256_file(path)}}
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not cached locally: record the id only
            return {"path": source, "files": {}, "note": "not a local file or cached snapshot; not hashed"}
    return {"path": str(path), "files": hash_tree(path)}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


EDIT_FILE = "edit_spec"  # the edit itself (Edit.save: edit_spec.json + edit_spec.safetensors)


def export_run(loaded, load: dict, run_manifest: dict, edit, out: Path, fmt: str, *, edit_source: str | None = None,
               quant: str | None = None, dtype: str | None = None, force: bool = False) -> dict:
    """Apply ``edit`` (an :class:`refusal_atlas.edits.Edit`) to ``loaded``'s weights and export it with a
    ``reproduce/`` bundle. ``load`` is how the model was loaded ({"model", "device", "dtype"}), so
    ``verify --rerun`` can repeat it; the bundle stores the edit itself, so the rerun needs no run directory.
    """
    from refusal_atlas.export.formats import export_model

    base_model = load.get("model") or loaded.source

    def bundle(tmp: Path, summary: dict) -> None:
        b = tmp / BUNDLE
        b.mkdir()
        edit.save(b / EDIT_FILE)
        write_json(b / "run_config.json", {"config": run_manifest.get("config"), "model": run_manifest.get("model"),
                                           "direction": run_manifest.get("direction")})
        write_json(b / "edit.json", {"kind": edit.edit_type, "label": edit.label, "fingerprint": edit.fingerprint(),
                                     "source": edit_source, "spec": edit.spec(), "report": summary.get("edit"),
                                     "lora": summary.get("lora")})
        write_json(b / "export.json", {"format": fmt, "quant": summary.get("quant"), "dtype": summary.get("dtype"),
                                       "base_model": base_model, "load": load})
        write_json(b / "versions.json", package_versions())
        write_json(b / "source.json", {**source_hashes(loaded.source), **loaded.info})
        write_json(b / "files.json", {"sha256": hash_tree(tmp, skip=(f"{BUNDLE}/files.json",))})

    return export_model(loaded, edit.apply_weights, out, fmt, quant=quant, dtype=dtype, base_model=base_model,
                        force=force, extras=bundle)


def check_hashes(path: Path) -> dict:
    """Compare every file listed in ``reproduce/files.json`` with its recorded sha256."""
    listing = path / BUNDLE / "files.json"
    if not listing.is_file():
        raise ArtifactError(f"{path} has no {BUNDLE}/files.json; it was not written by `refusal-atlas export`")
    recorded = read_json(listing).get("sha256", {})
    actual = hash_tree(path, skip=(f"{BUNDLE}/files.json",))
    return {"checked": len(recorded),
            "changed": sorted(f for f in recorded if f in actual and actual[f] != recorded[f]),
            "missing": sorted(f for f in recorded if f not in actual),
            "unlisted": sorted(f for f in actual if f not in recorded)}


def rerun(path: Path) -> dict:
    """Repeat the export from the bundle into a temp dir; compare source hashes and every model file."""
    from refusal_atlas.model.loading import load_model
    from refusal_atlas.export.formats import export_model

    from refusal_atlas.edits import load_edit

    b = path / BUNDLE
    export, source = read_json(b / "export.json"), read_json(b / "source.json")
    edit = load_edit(b / EDIT_FILE)  # checks the stored fingerprint
    load = export["load"]
    loaded = load_model(load["model"], device=load.get("device"), dtype=load.get("dtype"))
    now = source_hashes(loaded.source)
    source_changed = sorted(f for f, h in source.get("files", {}).items() if now["files"].get(f) != h)
    recorded = read_json(b / "files.json")["sha256"]
    with tempfile.TemporaryDirectory(prefix=".verify.", dir=path.parent) as tmp:
        out = Path(tmp) / "rerun"
        export_model(loaded, edit.apply_weights, out, export["format"], quant=export.get("quant"),
                     dtype=export.get("dtype"), base_model=export.get("base_model"))
        again = hash_tree(out)
    model_files = sorted(f for f in recorded if not f.startswith(f"{BUNDLE}/"))
    return {"source_changed": source_changed, "compared": model_files,
            "differ": [f for f in model_files if again.get(f) != recorded[f]]}
