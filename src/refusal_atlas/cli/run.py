"""The spine verbs: `run` (the end-to-end job), `extract`, `directions dim` and `select`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import ModelOpt, RunDirOpt, default_run_dir, parse_ints, parse_names
from refusal_atlas.cli.config import setting_help
from refusal_atlas.core.errors import RefusalAtlasError


def run(
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="default: runs/<timestamp>")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings (as the global --config)")] = None,
    model: ModelOpt = None,
    method: Annotated[str, typer.Option(help="dim, or som (dim + SOM directions + subset search)")] = "dim",
    layer: Annotated[Optional[int], typer.Option(help=setting_help("layer"))] = None,
    layers: Annotated[Optional[str], typer.Option(help=setting_help("layers", "candidate layers, e.g. 8,10,12"))] = None,
    positions: Annotated[Optional[str], typer.Option(help=setting_help("positions", "candidate positions, e.g. -1,-2"))] = None,
    n_train: Annotated[Optional[int], typer.Option(help=setting_help("n_train", "train prompts per side"))] = None,
    n_val: Annotated[Optional[int], typer.Option(help=setting_help("n_val", "validation prompts per side"))] = None,
    n_eval: Annotated[Optional[int], typer.Option(help=setting_help("n_eval", "held-out prompts per dataset"))] = None,
    eval_harmful: Annotated[Optional[str], typer.Option(help=setting_help("eval_harmful", "comma-separated dataset names or files"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=setting_help("max_new_tokens", "greedy tokens per completion"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=setting_help("batch_size", "prompts per forward pass"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=setting_help("seed", "prompt sampling and torch seed"))] = None,
    device: Annotated[Optional[str], typer.Option(help=setting_help("device", "cpu, cuda, mps (None: best available)"))] = None,
    dtype: Annotated[Optional[str], typer.Option(help=setting_help("dtype", "float32, bfloat16 or float16"))] = None,
    device_map: Annotated[Optional[str], typer.Option(help=setting_help("device_map", "auto|balanced|balanced_low_0|sequential|<file.json>"))] = None,
    max_memory: Annotated[Optional[str], typer.Option(help=setting_help("max_memory", "per-device limits, e.g. 0=20GiB,cpu=64GiB"))] = None,
    dtype_fallback: Annotated[Optional[bool], typer.Option(help=setting_help("dtype_fallback", "reload in float32 if --dtype gives NaN/inf"))] = None,
    backend: Annotated[Optional[str], typer.Option(help=setting_help("backend", "held-out generation: hf or vllm (GPU)"))] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help=setting_help("system_prompt", "system message (None: the template's)"))] = None,
    chat_template: Annotated[Optional[Path], typer.Option(help=setting_help("chat_template", "Jinja chat template file, for models without one"))] = None,
    resume: Annotated[bool, typer.Option(help="continue the run directory with its own settings")] = False,
    allow_low_refusal: Annotated[bool, typer.Option(help="continue (with a warning) when the model refuses < 10% "
                                                         "of the harmful train prompts")] = False,
    trials: Annotated[int, typer.Option(help="--method som: completed search trials to reach")] = 30,
    k: Annotated[int, typer.Option(help="--method som: directions per searched subset")] = 3,
) -> None:
    """The default end-to-end job: extract → DIM → select → held-out evaluation."""
    from refusal_atlas.settings import resolve_config
    from refusal_atlas.workflows.validate import check_new_run_dir

    if method not in ("dim", "som"):
        raise RefusalAtlasError(f"unknown method {method!r} for `run` (available: dim, som)")
    flags = dict(model=model, layer=layer, layers=parse_ints(layers), positions=parse_ints(positions), n_train=n_train,
                 n_val=n_val, n_eval=n_eval, eval_harmful=parse_names(eval_harmful), max_new_tokens=max_new_tokens,
                 batch_size=batch_size, seed=seed, device=device, system_prompt=system_prompt,
                 chat_template=chat_template and str(chat_template), dtype=dtype, device_map=device_map,
                 max_memory=max_memory, dtype_fallback=dtype_fallback, backend=backend)
    run_dir = run_dir or default_run_dir()
    manifest = check_new_run_dir(run_dir)
    # --resume: the run's own settings, then what the TOML file and the flags set explicitly
    base = manifest.get("config", {}) if resume and manifest else None
    cfg = resolve_config(flags, config_file=config, base=base).config
    if cfg.backend == "vllm":
        from refusal_atlas.export.vllm import check_vllm

        check_vllm()  # before any model loads
    if method == "som":
        from refusal_atlas.cli.som import run_som_command

        return run_som_command(cfg, run_dir, resume, trials=trials, k=k, allow_low_refusal=allow_low_refusal)
    from refusal_atlas.workflows.run import format_table, run as run_pipeline

    ws, records = run_pipeline(cfg, run_dir, resume=resume, allow_low_refusal=allow_low_refusal)
    d = ws.run.manifest().get("direction", {})
    typer.echo(f"\nDIM direction: layer {d.get('layer')}, position {d.get('position')}, norm {d.get('norm', 0):.2f}")
    typer.echo(format_table(records))
    typer.echo(f"\nrun directory: {ws.run.path}  (metrics.json, manifest.json, completions/)")


def extract_cmd(run_dir: RunDirOpt, model: ModelOpt = None,
                n_train: Annotated[Optional[int], typer.Option(help=setting_help("n_train", "train prompts per side"))] = None,
                filter_train: Annotated[Optional[bool], typer.Option(help=setting_help("filter_train"))] = None,
                allow_low_refusal: Annotated[bool, typer.Option(help="continue when the model refuses < 10%")] = False,
                ) -> None:
    """Residual-stream representations of harmful vs harmless train prompts (a new or an existing run)."""
    from refusal_atlas.settings import resolve_config
    from refusal_atlas.workflows.validate import EXTRACTION_SETTINGS, check_new_run_dir, run_config

    overrides = dict(model=model, n_train=n_train, filter_train=filter_train)
    manifest = check_new_run_dir(run_dir)
    cfg = run_config(manifest, overrides) if manifest else resolve_config(overrides).config
    from refusal_atlas.workflows.run import extract_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    sets = load_prompt_sets(cfg)  # bad prompt files fail before the model loads
    ws = open_workspace(cfg, run_dir, must_exist=manifest is not None, allowed=EXTRACTION_SETTINGS)
    acts = extract_step(ws, sets, allow_low_refusal=allow_low_refusal)
    typer.echo(f"saved {acts['harmful'].n} harmful + {acts['harmless'].n} harmless representations "
               f"({len(acts['harmful'].layers)} layers) to {ws.run / 'activations.safetensors'}")


def directions_dim(run_dir: RunDirOpt) -> None:
    """Difference-in-means candidates for every (position, layer)."""
    from refusal_atlas.workflows.validate import check_run_dir

    check_run_dir(run_dir, require_manifest=False)
    from refusal_atlas.model.activations import load_activation_sets
    from refusal_atlas.directions.dim import difference_in_means
    from refusal_atlas.core.io import save_tensors
    from refusal_atlas.core.rundir import RunDir

    run = RunDir(run_dir)
    acts = load_activation_sets(run / "activations.safetensors")
    cands = difference_in_means(acts["harmful"], acts["harmless"])
    save_tensors(run.direction_path("dim_candidates"), {"vectors": cands.vectors},
                 {"layers": cands.layers, "positions": cands.positions})
    typer.echo(f"saved {len(cands.positions)}×{len(cands.layers)} DIM candidates to {run.direction_path('dim_candidates')}")


def select_cmd(run_dir: RunDirOpt,
               layers: Annotated[Optional[str], typer.Option(help=setting_help("layers", "candidate layers, e.g. 8,10"))] = None,
               positions: Annotated[Optional[str], typer.Option(help=setting_help("positions", "e.g. -1,-2"))] = None,
               kl_threshold: Annotated[Optional[float], typer.Option(help=setting_help("kl_threshold", "KL filter bound"))] = None) -> None:
    """Arditi-style selection of one DIM candidate on validation prompts."""
    from refusal_atlas.workflows.validate import SELECTION_SETTINGS, check_run_dir, run_config

    overrides = dict(layers=parse_ints(layers), positions=parse_ints(positions), kl_threshold=kl_threshold)
    manifest = check_run_dir(run_dir)
    cfg = run_config(manifest, overrides)
    if not (run_dir / "directions" / "dim_candidates.safetensors").is_file():
        raise RefusalAtlasError(f"no DIM candidates in {run_dir}; run `refusal-atlas directions dim` first")
    from refusal_atlas.workflows.run import load_dim_candidates, select_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    sets = load_prompt_sets(cfg)
    ws = open_workspace(cfg, run_dir, must_exist=True, allowed=SELECTION_SETTINGS)
    d = select_step(ws, load_dim_candidates(ws), sets)
    typer.echo(f"selected layer {d.layer}, position {d.position}: refusal {d.meta.get('refusal', float('nan')):.3f}, "
               f"KL {d.meta.get('kl', float('nan')):.4f}, steering {d.meta.get('steering', float('nan')):.3f}")


def register(app: typer.Typer, directions_app: typer.Typer) -> None:
    app.command()(run)
    app.command("extract")(extract_cmd)
    directions_app.command("dim")(directions_dim)
    app.command("select")(select_cmd)
