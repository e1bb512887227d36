"""`refusal-atlas concept`: map any concept from your own prompt files and marker list (see workflows/concept.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def concept_cmd(
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", help="new run directory for the concept")],
    positive: Annotated[str, typer.Option(help="prompt file (or set) where the model shows the concept")],
    negative: Annotated[str, typer.Option(help="prompt file (or set) where it does not")],
    markers: Annotated[Path, typer.Option(help="text file, one marker per line: a completion containing one "
                                               "shows the concept")],
    name: Annotated[str, typer.Option(help="concept name used in labels")] = "concept",
    start_words: Annotated[Optional[str], typer.Option(help="comma-separated next-token words for the logit "
                                                            "score (default: the capitalised markers)")] = None,
    model: Annotated[str, typer.Option(help="HF id, local dir, .gguf file or 'embedded'")] = "embedded",
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, mps (default: best available)")] = None,
    layers: Annotated[Optional[str], typer.Option(help="candidate layers, e.g. 8,10 (default: L/3 .. 0.8·L)")] = None,
    n_val: Annotated[int, typer.Option(help="prompts per file that select the layer")] = 8,
    n_test: Annotated[int, typer.Option(help="held-out prompts per file for the reported rates")] = 12,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per completion")] = 32,
    kl_threshold: Annotated[float, typer.Option(help="selection: KL bound on negative val prompts")] = 0.1,
    seed: Annotated[int, typer.Option(help="shuffles the files before the train/val/test split")] = 0,
    batch_size: Annotated[int, typer.Option(help="prompts per forward pass")] = 16,
    force: Annotated[bool, typer.Option(help="replace a non-empty run directory")] = False,
) -> None:
    """Concept direction (DIM of positive − negative prompts), selected on val prompts, ablated and added on
    held-out prompts; the marker rate is the concept's "refusal rate"."""
    from refusal_atlas.cli.common import parse_ints, parse_names
    from refusal_atlas.workflows.concept import ConceptSpec, concept, concept_summary, read_markers

    spec = ConceptSpec(name=name, positive=positive, negative=negative, markers=read_markers(markers),
                       start_words=parse_names(start_words) or [], n_val=n_val, n_test=n_test, layers=parse_ints(layers),
                       kl_threshold=kl_threshold, max_new_tokens=max_new_tokens, seed=seed)
    records, report = concept(run_dir, spec, model=model, device=device, batch_size=batch_size, force=force)
    typer.echo(concept_summary(records))
    typer.echo(f"\nreport: {report}")


def register(app: typer.Typer) -> None:
    app.command("concept")(concept_cmd)
