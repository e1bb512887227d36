"""`evaluate` (every dataset × intervention × judge, damage, benchmarks) and `report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import RunDirOpt, parse_names, reopen_workspace
from refusal_atlas.core.errors import RefusalAtlasError


def evaluate_cmd(
    run_dir: RunDirOpt,
    judge: Annotated[str, typer.Option(help="comma-separated: substring, hf, endpoint")] = "substring",
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
    from refusal_atlas.workflows.validate import check_at_least, check_datasets, check_direction_file, check_run_dir, run_config

    manifest = check_run_dir(run_dir)  # milliseconds: before anything heavy is imported
    check_at_least(n=(n, 1), max_new_tokens=(max_new_tokens, 1), kl_tokens=(kl_tokens, 1), limit=(limit, 1),
                   concurrency=(concurrency, 1))
    if timeout <= 0:
        raise RefusalAtlasError(f"--timeout must be > 0 seconds, got {timeout}")
    cfg = run_config(manifest)
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.evaluation.evaluate import (EvalPlan, check_interventions, evaluate_run, format_records,
                                                   parse_interventions)
    from refusal_atlas.evaluation.judges import JudgeOptions, check_judges, make_judges

    judge_names, names = parse_names(judge) or [], parse_names(interventions) or []
    opts = JudgeOptions(judge_model=judge_model, endpoint_url=endpoint_url, endpoint_model=endpoint_model,
                        endpoint_rubric=rubric, concurrency=concurrency, timeout=timeout)
    check_judges(judge_names, opts)  # cheap checks before the model loads
    _check_judge_model(judge_names, judge_model)
    kinds = check_interventions(names)
    if backend not in ("hf", "vllm"):
        raise RefusalAtlasError(f"unknown --backend {backend!r} (hf or vllm)")
    path = run_dir / "directions" / f"{directions}.safetensors"
    if any(kind != "none" for kind, _ in kinds):
        check_direction_file(path, manifest)
    saved_edit = None
    if edit is not None:
        from refusal_atlas.edits import load_run_edit

        saved_edit = load_run_edit(run_dir, edit)
    n_prompts, length = cfg.n_eval if n is None else n, cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
    dataset_names = parse_names(datasets) or [*cfg.eval_harmful, cfg.eval_harmless, "xstest"]
    check_datasets(dataset_names, n_prompts, cfg.seed)
    if "endpoint" in judge_names:
        from refusal_atlas.workflows.validate import check_endpoint

        check_endpoint(endpoint_url or "", endpoint_model, timeout)
    if model is not None:
        from refusal_atlas.evaluation.exported import exported_kind

        exported_kind(model)
    if backend == "vllm":
        from refusal_atlas.export.vllm import check_vllm

        check_vllm()  # before the model loads
    ws = reopen_workspace(run_dir)
    specs = parse_interventions(names, DirectionSet.load(path) if path.exists() else None, mode=cfg.ablation_mode)
    specs += [saved_edit] if saved_edit is not None else []
    opts.cache_dir, opts.device = ws.run / "judgements", cfg.device
    judges = make_judges(judge_names, opts, reuse={cfg.model: (ws.loaded.model, ws.loaded.tokenizer, ws.loaded.name)})
    plan = EvalPlan(datasets=dataset_names, interventions=specs, judges=judges, n=n_prompts, max_new_tokens=length,
                    kl_tokens=kl_tokens, benchmarks=parse_names(benchmarks) or [], limit=limit, batch_size=cfg.batch_size,
                    generation_batch_size=cfg.generation_batch_size, seed=cfg.seed, backend=_generation_backend(ws, backend),
                    stop_when_decided=cfg.stop_when_decided and model is None)  # an export is compared whole
    if model is not None:
        from refusal_atlas.evaluation.exported import evaluate_exported

        return typer.echo(format_records(evaluate_exported(ws, plan, model, base=base)))
    typer.echo(format_records(evaluate_run(ws, plan)))


def _generation_backend(ws, name: str):
    if name == "hf":
        return None
    from refusal_atlas.export.vllm import VllmBackend

    return VllmBackend.for_workspace(ws)


def _check_judge_model(judge_names: list[str], judge_model: str | None) -> None:
    from refusal_atlas.model.files import is_local_model

    if "hf" in judge_names and judge_model and judge_model != "embedded" and is_local_model(judge_model):
        if not Path(judge_model).expanduser().exists():
            raise RefusalAtlasError(f"judge model not found: {judge_model}")


def report_cmd(run_dir: RunDirOpt) -> None:
    """Plots and an HTML report of everything in a run directory."""
    from refusal_atlas.workflows.validate import check_run_dir

    check_run_dir(run_dir)
    from refusal_atlas.report.html import build_report

    typer.echo(f"wrote {build_report(run_dir)}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)
