"""The `evaluate` job on a run directory: every dataset × intervention × judge, damage (KL), benchmarks,
optionally a saved edit and an exported model, all appended to metrics.json.

Every input is checked first, from what is on disk (run directory, counts, judges, direction file, saved
edit, datasets, endpoint, exported model, vLLM), before the model loads; the library's
:func:`refusal_atlas.evaluation.evaluate.evaluate_run` then does the work with the run's model.
"""

from __future__ import annotations

from pathlib import Path

from refusal_atlas.core.errors import RefusalAtlasError


def evaluate(run_dir: Path, *, judges: list[str] | None = None, interventions: list[str], datasets: list[str] | None = None,
             directions: str = "dim", n: int | None = None, max_new_tokens: int | None = None, kl_tokens: int = 16,
             judge_model: str | None = None, endpoint_url: str | None = None, endpoint_model: str | None = None,
             rubric: str = "strongreject", concurrency: int = 8, timeout: float = 60.0, api_key: str | None = None,
             benchmarks: list[str] | None = None, limit: int | None = None, edit: str | None = None,
             model: Path | None = None, base: str | None = None, backend: str = "hf") -> list[dict]:
    """Judge the run's held-out sets (default: its eval sets + xstest) under ``interventions`` (and the saved
    ``edit``) by ``judges`` (default: the run's ``evaluation.judge``); with ``model``, also the exported model on
    the same prompts. Returns the new records."""
    from refusal_atlas.settings import run_settings
    from refusal_atlas.workflows.validate import check_at_least, check_datasets, check_direction_file, check_run_dir

    manifest = check_run_dir(run_dir)  # milliseconds: before anything heavy is imported
    check_at_least(n=(n, 1), max_new_tokens=(max_new_tokens, 1), kl_tokens=(kl_tokens, 1), limit=(limit, 1),
                   concurrency=(concurrency, 1))
    if timeout <= 0:
        raise RefusalAtlasError(f"--timeout must be > 0 seconds, got {timeout}")
    settings = run_settings(manifest)
    judges = [settings.evaluation.judge] if judges is None else list(judges)
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.evaluation.evaluate import EvalPlan, check_interventions, evaluate_run, parse_interventions
    from refusal_atlas.evaluation.judges import JudgeOptions, check_judges, make_judges

    opts = JudgeOptions(judge_model=judge_model, endpoint_url=endpoint_url, endpoint_model=endpoint_model,
                        endpoint_rubric=rubric, concurrency=concurrency, timeout=timeout, api_key=api_key)

    check_judges(judges, opts)  # cheap checks before the model loads
    _check_judge_model(judges, opts.judge_model)
    kinds = check_interventions(interventions)
    if backend not in ("hf", "vllm"):
        raise RefusalAtlasError(f"unknown --backend {backend!r} (hf or vllm)")
    path = run_dir / "directions" / f"{directions}.safetensors"
    if any(kind != "none" for kind, _ in kinds):
        check_direction_file(path, manifest)
    saved_edit = None
    if edit is not None:
        from refusal_atlas.edits import load_run_edit

        saved_edit = load_run_edit(run_dir, edit)
    ev, data = settings.evaluation, settings.data
    n_prompts, length = ev.n_eval if n is None else n, ev.max_new_tokens if max_new_tokens is None else max_new_tokens
    dataset_names = datasets or [*ev.eval_harmful, ev.eval_harmless, "xstest"]
    check_datasets(dataset_names, n_prompts, data.seed)
    if "endpoint" in judges:
        from refusal_atlas.workflows.validate import check_endpoint

        check_endpoint(opts.endpoint_url or "", opts.endpoint_model, opts.timeout)
    if model is not None:
        from refusal_atlas.evaluation.exported import exported_kind

        exported_kind(model)
    if backend == "vllm":
        from refusal_atlas.export.vllm import check_vllm

        check_vllm()  # before the model loads
    from refusal_atlas.workflows.workspace import open_workspace

    ws = open_workspace(settings, run_dir, must_exist=True, generates=True)
    specs = parse_interventions(interventions, DirectionSet.load(path) if path.exists() else None,
                                mode=settings.selection.ablation_mode)
    specs += [saved_edit] if saved_edit is not None else []
    opts.cache_dir, opts.device = ws.run / "judgements", settings.model.device
    built = make_judges(judges, opts, reuse={settings.model.model: (ws.loaded.model, ws.loaded.tokenizer,
                                                                     ws.loaded.name)})
    plan = EvalPlan(datasets=dataset_names, interventions=specs, judges=built, n=n_prompts, max_new_tokens=length,
                    kl_tokens=kl_tokens, benchmarks=benchmarks or [], limit=limit, batch_size=settings.model.batch_size,
                    generation_batch_size=ev.generation_batch_size, seed=data.seed,
                    backend=ws.generation_backend(backend),
                    stop_when_decided=ev.stop_when_decided and model is None)  # an export is compared whole
    if model is not None:
        from refusal_atlas.evaluation.exported import evaluate_exported

        return evaluate_exported(ws.adapter, ws.chat, ws.run, plan, model, base=base, device=settings.model.device,
                                 dtype=settings.model.dtype, model_name=ws.loaded.name)
    return evaluate_run(ws.adapter, ws.chat, ws.run, plan, ws.loaded.name)


def _check_judge_model(judge_names: list[str], judge_model: str | None) -> None:
    from refusal_atlas.model.files import is_local_model

    if "hf" in judge_names and judge_model and judge_model != "embedded" and is_local_model(judge_model):
        if not Path(judge_model).expanduser().exists():
            raise RefusalAtlasError(f"judge model not found: {judge_model}")
