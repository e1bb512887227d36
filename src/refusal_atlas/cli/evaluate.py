"""`evaluate` (every dataset × intervention × judge, damage, benchmarks) and `report`; the job is in
workflows/evaluate.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import RunDirOpt, parse_names


def evaluate_cmd(
    run_dir: RunDirOpt,
    judge: Annotated[Optional[str], typer.Option(help="comma-separated: substring, markers, meaning, hf, endpoint "
                                                      "(default: the run's evaluation.judge)")] = None,
    datasets: Annotated[Optional[str], typer.Option(help="default: the run's eval sets + xstest")] = None,
    interventions: Annotated[str, typer.Option(help="none, ablate, actadd, actadd:<coeff>")] = "none,ablate,actadd",
    directions: Annotated[str, typer.Option(help="direction file name in the run directory")] = "dim",
    n: Annotated[Optional[int], typer.Option(help="prompts per dataset (default: the run's n_eval)")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="default: the run's max_new_tokens")] = None,
    kl_tokens: Annotated[int, typer.Option(help="teacher-forced KL over this many clean tokens")] = 16,
    judge_model: Annotated[Optional[str], typer.Option(help="hf judge: HF id, directory or 'embedded'")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(help="endpoint judge: http://host:port/v1")] = None,
    endpoint_model: Annotated[Optional[str], typer.Option(help="endpoint judge: served model name")] = None,
    rubric: Annotated[str, typer.Option(help="endpoint judge rubric: strongreject or harmbench")] = "strongreject",
    concurrency: Annotated[int, typer.Option(help="endpoint judge: parallel requests")] = 8,
    timeout: Annotated[float, typer.Option(help="endpoint judge: seconds per request")] = 60.0,
    benchmarks: Annotated[Optional[str], typer.Option(help="lm-eval tasks, e.g. smoke,arc_challenge")] = None,
    limit: Annotated[Optional[int], typer.Option(help="lm-eval: examples per task (smoke runs)")] = None,
    edit: Annotated[Optional[str], typer.Option(help="also evaluate a saved edit, e.g. search_best (edits/NAME.json)")] = None,
    model: Annotated[Optional[Path], typer.Option(help="also score an exported model (dir, LoRA adapter, .gguf)")] = None,
    base: Annotated[Optional[str], typer.Option(help="--model LoRA: base model (default: adapter_config's)")] = None,
    backend: Annotated[str, typer.Option(help="generation engine: hf, or vllm (GPU; edits exported as weights)")] = "hf",
) -> None:
    """Judge every dataset × intervention × judge, damage (KL) and benchmarks; appends to metrics.json."""
    from refusal_atlas.settings import endpoint_api_key
    from refusal_atlas.workflows.evaluate import evaluate

    records = evaluate(run_dir, judges=parse_names(judge), interventions=parse_names(interventions) or [],
                       datasets=parse_names(datasets), directions=directions, n=n, max_new_tokens=max_new_tokens,
                       kl_tokens=kl_tokens, judge_model=judge_model, endpoint_url=endpoint_url,
                       endpoint_model=endpoint_model, rubric=rubric, concurrency=concurrency, timeout=timeout,
                       api_key=endpoint_api_key(), benchmarks=parse_names(benchmarks), limit=limit, edit=edit,
                       model=model, base=base, backend=backend)
    from refusal_atlas.evaluation.evaluate import format_records, length_note

    typer.echo(format_records(records))
    note = length_note(records)
    if note:
        typer.echo(note, err=True)


def report_cmd(run_dir: RunDirOpt) -> None:
    """Plots and an HTML report of everything in a run directory."""
    from refusal_atlas.workflows.validate import check_run_dir

    check_run_dir(run_dir)
    from refusal_atlas.report.html import build_report

    typer.echo(f"wrote {build_report(run_dir)}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)
