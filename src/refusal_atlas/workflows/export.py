"""The `export` job: a run's edit baked into the model's weights, written as safetensors, a LoRA adapter or
GGUF, plus the reproduce/ bundle (export/bundle.py).

The edit is the run's DIM direction ablated in its ablation mode, another direction file of the run, or a
saved edit (edits/NAME.json) exactly as it was evaluated. Every input is checked before the model loads, and
so are the memory the export needs beside the model and the disk its output will take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_atlas.core.errors import RefusalAtlasError


def chosen_edit(run_dir: Path, manifest: dict, directions: str, edit: str | None):
    """The edit to export, checked against the run's model before anything loads: a saved edit
    (edits/NAME.json) or full ablation of a direction file in the run's ablation mode → (edit, source)."""
    from refusal_atlas.settings import run_settings
    from refusal_atlas.workflows.validate import check_direction_file

    if edit is not None:
        from refusal_atlas.edits import load_run_edit

        chosen = load_run_edit(run_dir, edit)
        if not chosen.has_weight_form:
            raise RefusalAtlasError(f"edit {edit!r} ({chosen.edit_type}) exists as hooks only and cannot be exported")
        return chosen, f"edits/{edit}"
    path = run_dir / "directions" / f"{directions}.safetensors"
    check_direction_file(path, manifest)
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.edits import DirectionalAblation

    mode = run_settings(manifest).selection.ablation_mode
    return DirectionalAblation(DirectionSet.load(path), mode, name=directions), f"directions/{directions}"


def check_gguf_source(spec: str, quant: str | None) -> None:
    """The GGUF writer's architecture rules (export/gguf.py) on the source's config.json, before anything loads,
    when the source is a local directory or a Hugging Face id in the local cache; other sources (the embedded
    GGUF) are checked once loaded, still before anything is written."""
    import json
    from types import SimpleNamespace

    from refusal_atlas.export.gguf import check_gguf_config, check_gguf_request

    path = Path(spec).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # not in the local cache (or not an id at all): nothing to read before loading
            return
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(cfg, dict) and cfg.get("model_type"):
        check_gguf_request(cfg["model_type"], quant or "f16")
        check_gguf_config(SimpleNamespace(**cfg))


def export(run_dir: Path, out: Path, *, format: str = "safetensors", quant: str | None = None,
           dtype: str | None = None, directions: str = "dim", edit: str | None = None,
           force: bool = False) -> tuple[Any, dict[str, Any]]:
    """Write the edited model and its bundle to ``out`` → (the edit, export_run's summary)."""
    from refusal_atlas.core.io import check_output_dir
    from refusal_atlas.export.formats import check_export_request
    from refusal_atlas.settings import run_settings
    from refusal_atlas.workflows.validate import (check_disk, check_memory, check_output_parent, check_run_dir,
                                                  export_needs)

    manifest = check_run_dir(run_dir)  # milliseconds, before anything heavy is imported
    check_export_request(format, quant, dtype)
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise RefusalAtlasError(f"--out {out} is inside the run directory {run_dir}; export elsewhere")
    check_output_dir(out, force)
    check_output_parent(out)
    chosen, source = chosen_edit(run_dir, manifest, directions, edit)
    settings = run_settings(manifest)
    if format == "gguf":
        check_gguf_source(settings.model.model, quant)
    needs = export_needs(settings, format, quant, dtype)
    if needs is not None:  # before anything heavy is imported: the disk, and the memory the export adds
        check_disk(out, needs[1], f"exporting {format}")
        check_memory(settings, extra=needs[0], what="this export")
    from refusal_atlas.export.bundle import export_run
    from refusal_atlas.workflows.workspace import reopen_workspace

    ws = reopen_workspace(run_dir, memory_extra=needs[0] if needs else None)  # checked again as it loads
    m = ws.settings.model
    load = {"model": m.model, "device": m.device, "dtype": m.dtype}
    summary = export_run(ws.loaded, load, manifest, chosen, out, format, edit_source=source, quant=quant,
                         dtype=dtype, force=force)
    return chosen, summary
