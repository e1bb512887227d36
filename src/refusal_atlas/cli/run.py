"""The spine verbs: `run` (the end-to-end job), `extract`, `directions dim` and `select` (jobs: workflows/verbs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import ModelOpt, RunDirOpt, default_run_dir, parse_ints, parse_names
from refusal_atlas.cli.config import setting_help


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
    judge: Annotated[Optional[str], typer.Option(help=setting_help("judge", "judge of the held-out rates: substring, "
                                                                           "markers or meaning"))] = None,
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
    k: Annotated[Optional[int], typer.Option(help=setting_help("search.k", "--method som: directions per searched "
                                                                           "subset"))] = None,
) -> None:
    """The default end-to-end job: extract → DIM → select → held-out evaluation."""
    from refusal_atlas.workflows import verbs

    flags = dict(model=model, layer=layer, layers=parse_ints(layers), positions=parse_ints(positions), n_train=n_train,
                 n_val=n_val, n_eval=n_eval, eval_harmful=parse_names(eval_harmful), max_new_tokens=max_new_tokens, judge=judge,
                 batch_size=batch_size, seed=seed, device=device, system_prompt=system_prompt,
                 chat_template=chat_template and str(chat_template), dtype=dtype, device_map=device_map,
                 max_memory=max_memory, dtype_fallback=dtype_fallback, backend=backend, search={"k": k})
    result = verbs.run(run_dir or default_run_dir(), flags, config_file=config, method=method, resume=resume,
                       allow_low_refusal=allow_low_refusal, trials=trials)
    if result.search is not None:
        from refusal_atlas.workflows.som import format_comparison, format_search

        typer.echo(format_search(result.search))
        typer.echo("\nheld-out comparison (never seen by the search):")
        typer.echo(format_comparison(result.comparison))
        typer.echo(f"\nrun directory: {result.ws.run.path}  (metrics.json, search.json, study.db, directions/)")
        return
    from refusal_atlas.workflows.run import format_table

    d = result.ws.run.manifest().get("direction", {})
    typer.echo(f"\nDIM direction: layer {d.get('layer')}, position {d.get('position')}, norm {d.get('norm', 0):.2f}")
    typer.echo(format_table(result.records))
    typer.echo(f"\nrun directory: {result.ws.run.path}  (metrics.json, manifest.json, completions/)")


def extract_cmd(run_dir: RunDirOpt, model: ModelOpt = None,
                n_train: Annotated[Optional[int], typer.Option(help=setting_help("n_train", "train prompts per side"))] = None,
                filter_train: Annotated[Optional[bool], typer.Option(help=setting_help("filter_train"))] = None,
                allow_low_refusal: Annotated[bool, typer.Option(help="continue when the model refuses < 10%")] = False,
                ) -> None:
    """Residual-stream representations of harmful vs harmless train prompts (a new or an existing run)."""
    from refusal_atlas.workflows import verbs

    ws, acts = verbs.extract(run_dir, dict(model=model, n_train=n_train, filter_train=filter_train),
                             allow_low_refusal=allow_low_refusal)
    typer.echo(f"saved {acts['harmful'].n} harmful + {acts['harmless'].n} harmless representations "
               f"({len(acts['harmful'].layers)} layers) to {ws.run / 'activations.safetensors'}")


def directions_dim(run_dir: RunDirOpt) -> None:
    """Difference-in-means candidates for every (position, layer)."""
    from refusal_atlas.workflows import verbs

    cands, path = verbs.dim(run_dir)
    typer.echo(f"saved {len(cands.positions)}×{len(cands.layers)} DIM candidates to {path}")


def select_cmd(run_dir: RunDirOpt,
               layers: Annotated[Optional[str], typer.Option(help=setting_help("layers", "candidate layers, e.g. 8,10"))] = None,
               positions: Annotated[Optional[str], typer.Option(help=setting_help("positions", "e.g. -1,-2"))] = None,
               kl_threshold: Annotated[Optional[float], typer.Option(help=setting_help("kl_threshold", "KL filter bound"))] = None) -> None:
    """Arditi-style selection of one DIM candidate on validation prompts."""
    from refusal_atlas.workflows import verbs

    d = verbs.select(run_dir, dict(layers=parse_ints(layers), positions=parse_ints(positions),
                                   kl_threshold=kl_threshold))
    typer.echo(f"selected layer {d.layer}, position {d.position}: refusal {d.meta.get('refusal', float('nan')):.3f}, "
               f"KL {d.meta.get('kl', float('nan')):.4f}, steering {d.meta.get('steering', float('nan')):.3f}")


def register(app: typer.Typer, directions_app: typer.Typer) -> None:
    app.command()(run)
    app.command("extract")(extract_cmd)
    directions_app.command("dim")(directions_dim)
    app.command("select")(select_cmd)
