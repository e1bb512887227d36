"""CLI verbs `export` (safetensors | lora | gguf, with a reproducibility bundle; the job is in
workflows/export.py) and `verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.core.errors import RefusalAtlasError


def export_cmd(
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", help="run directory")],
    out: Annotated[Path, typer.Option(help="output directory (model + reproduce/ bundle)")],
    format: Annotated[str, typer.Option("--format", help="safetensors, lora (PEFT adapter) or gguf")] = "safetensors",
    quant: Annotated[Optional[str], typer.Option(help="gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="safetensors: float32, bfloat16 or float16 "
                                                      "(default: the source's dtype)")] = None,
    directions: Annotated[str, typer.Option(help="direction file name in the run directory")] = "dim",
    edit: Annotated[Optional[str], typer.Option(help="export a saved edit (edits/NAME.json), e.g. search_best")] = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out directory")] = False,
) -> None:
    """Write the model with an edit baked into its weights (default: the run's DIM direction
    orthogonalized out; --edit: a saved edit, exactly as it was evaluated), plus reproduce/."""
    from refusal_atlas.workflows.export import export

    chosen, summary = export(run_dir, out, format=format, quant=quant, dtype=dtype, directions=directions, edit=edit,
                             force=force)
    detail = summary.get("quant") or summary.get("dtype") or f"rank {summary['lora']['rank']}"
    typer.echo(f"exported {chosen.label} ({chosen.edit_type}) as {format} ({detail}) to {out}; "
               f"reproduce/ holds the bundle (`refusal-atlas verify {out}`)")


def verify_cmd(
    path: Annotated[Path, typer.Argument(help="a directory written by `refusal-atlas export`")],
    rerun: Annotated[bool, typer.Option(help="reload the source model, redo the edit and compare byte for byte")] = False,
) -> None:
    """Re-check the sha256 of every exported file; with --rerun, recompute the export from the bundle."""
    from refusal_atlas.export.bundle import check_hashes, rerun as rerun_export

    if not path.is_dir():
        raise RefusalAtlasError(f"{path} is not a directory written by `refusal-atlas export`")
    res = check_hashes(path)
    bad = res["changed"] + res["missing"]
    for key in ("changed", "missing", "unlisted"):
        for name in res[key]:
            typer.echo(f"{key}: {name}")
    typer.echo(f"hashes: {res['checked'] - len(bad)}/{res['checked']} files match")
    if not bad and rerun:
        again = rerun_export(path)
        for name in again["source_changed"]:
            typer.echo(f"source file changed since export: {name}")
        for name in again["differ"]:
            typer.echo(f"differs on rerun: {name}")
        typer.echo(f"rerun: {len(again['compared']) - len(again['differ'])}/{len(again['compared'])} model files "
                   "identical byte for byte")
        bad = again["differ"] + again["source_changed"]
    if bad:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("verify")(verify_cmd)
