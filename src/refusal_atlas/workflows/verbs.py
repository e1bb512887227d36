"""The command line's verbs, one function each: check the input, then run the job.

Each function first checks what it was given against what is on disk (run directory, manifest, settings,
direction files) without importing torch or loading a model, so a typo costs milliseconds and leaves
nothing behind; then it runs the job from the workflow module that holds it (workflows/run.py, som.py,
search.py, gradient.py). The CLI parses flags into these arguments and prints what they return; the
verbs whose whole job is light (evaluate, export, chat) live in workflows/evaluate.py, export.py and chat.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_atlas.core.errors import ArtifactError, ConfigError
from refusal_atlas.settings import Settings, flat_config, resolve_settings, run_settings
from refusal_atlas.workflows.validate import (EXTRACTION_SETTINGS, SELECTION_SETTINGS, check_at_least,
                                              check_direction_file, check_memory, check_model, check_moe_only,
                                              check_new_run_dir, check_run_dir)

if TYPE_CHECKING:
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.directions.dim import DimCandidates
    from refusal_atlas.model.activations import ActivationSet
    from refusal_atlas.workflows.workspace import Workspace


def _run_seed(run_dir: str | Path, seed: int | None) -> int:
    """``seed`` if given, else the run's recorded seed (its manifest; 0 without one)."""
    if seed is not None:
        return seed
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.is_file():
        return 0
    return int(flat_config(json.loads(manifest.read_text(encoding="utf-8")).get("config", {})).get("seed", 0))


# --- run, extract, directions dim, select -----------------------------------------------------------------
@dataclass
class RunResult:
    """What `run` made: the workspace and, by method, the DIM metrics or the SOM search and comparison."""

    ws: Workspace
    records: list[dict] | None = None  # --method dim: the held-out metrics records
    search: dict[str, Any] | None = None  # --method som: the subset search's summary
    comparison: dict[str, Any] | None = None  # --method som: held-out SOM subset vs DIM


def run(run_dir: Path, flags: dict[str, Any], *, config_file: Path | None = None, method: str = "dim",
        resume: bool = False, allow_low_refusal: bool = False, trials: int = 30) -> RunResult:
    """`run`: the end-to-end job in a new run directory (``resume``: continue one with its own settings).

    ``flags``: settings given on the command line (None: not given); ``method`` dim, or som (DIM, then SOM
    directions and a subset search of ``search.k`` directions to ``trials`` trials).
    """
    if method not in ("dim", "som"):
        raise ConfigError(f"unknown method {method!r} for `run` (available: dim, som)")
    manifest = check_new_run_dir(run_dir)
    # --resume: the run's own settings, then what the TOML file and the flags set explicitly
    base = manifest.get("config", {}) if resume and manifest else None
    settings = resolve_settings(flags, config_file, base=base).settings
    check_judge(settings.evaluation.judge)
    settings = check_memory(settings, generates=True)  # milliseconds, before the heavy imports below
    if settings.evaluation.backend == "vllm":
        from refusal_atlas.export.vllm import check_vllm

        check_vllm()  # before any model loads
    if method == "som":
        from refusal_atlas.workflows.som import run_som

        ws, summary, comparison = run_som(settings, run_dir, trials, resume=resume, allow_low_refusal=allow_low_refusal)
        return RunResult(ws, search=summary, comparison=comparison)
    from refusal_atlas.workflows.run import run as run_dim

    ws, records = run_dim(settings, run_dir, resume=resume, allow_low_refusal=allow_low_refusal)
    return RunResult(ws, records=records)


def check_judge(name: str) -> None:
    """The judge of reported rates can be built (e.g. the meaning judge's head and embedding model are installed),
    checked before any model loads."""
    from refusal_atlas.evaluation.judges import JudgeOptions, check_judges

    check_judges([name], JudgeOptions())


def extract(run_dir: Path, flags: dict[str, Any], *,
            allow_low_refusal: bool = False) -> tuple[Workspace, dict[str, ActivationSet]]:
    """`extract`: representations of the harmful and harmless train prompts, in a new or an existing run."""
    manifest = check_new_run_dir(run_dir)
    settings = run_settings(manifest, flags) if manifest else resolve_settings(flags).settings
    from refusal_atlas.workflows.run import extract_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    sets = load_prompt_sets(settings)  # bad prompt files fail before the model loads
    ws = open_workspace(settings, run_dir, must_exist=manifest is not None, allowed=EXTRACTION_SETTINGS)
    return ws, extract_step(ws, sets, allow_low_refusal=allow_low_refusal)


def dim(run_dir: Path) -> tuple[DimCandidates, Path]:
    """`directions dim`: DIM candidates from the run's saved representations (no model loads) → (them, file)."""
    check_run_dir(run_dir, require_manifest=False)
    from refusal_atlas.core.rundir import RunDir
    from refusal_atlas.model.activations import load_activation_sets
    from refusal_atlas.workflows.run import dim_step

    run = RunDir(run_dir)
    return dim_step(run, load_activation_sets(run / "activations.safetensors")), run.direction_path("dim_candidates")


def select(run_dir: Path, flags: dict[str, Any]) -> DirectionSet:
    """`select`: Arditi-style choice of one DIM candidate on the run's validation prompts."""
    settings = run_settings(check_run_dir(run_dir), flags)
    if not (run_dir / "directions" / "dim_candidates.safetensors").is_file():
        raise ArtifactError(f"no DIM candidates in {run_dir}; run `refusal-atlas directions dim` first")
    from refusal_atlas.workflows.run import load_dim_candidates, select_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    sets = load_prompt_sets(settings)
    ws = open_workspace(settings, run_dir, must_exist=True, allowed=SELECTION_SETTINGS)
    return select_step(ws, load_dim_candidates(ws.run), sets)


# --- directions som | rdo | cone | repind --------------------------------------------------------------------
def som(run_dir: Path, *, grid: str = "4x4", sigma: float = 0.33, lr: float = 0.01, iterations: int = 10_000,
        layer: int | None = None, seed: int | None = None, lr_schedule: str = "asymptotic") -> tuple[DirectionSet, Path]:
    """`directions som`: SOM directions on the run's harmful representations (no model loads) → (them, file)."""
    check_run_dir(run_dir, require_manifest=False)
    from refusal_atlas.core.rundir import RunDir
    from refusal_atlas.directions.som import SomDirections, parse_grid
    from refusal_atlas.workflows.som import som_step

    run = RunDir(run_dir)
    builder = SomDirections(grid=parse_grid(grid), sigma=sigma, lr=lr, iterations=iterations,
                            seed=_run_seed(run_dir, seed), lr_schedule=lr_schedule)  # type: ignore[arg-type]
    return som_step(run, builder, layer=layer), run.direction_path("som")


def train(method: str, run_dir: Path, training: dict[str, Any], **options: Any) -> tuple[Workspace, Any]:
    """`directions rdo|cone|repind`: train on the run and save R/directions/<name>.safetensors.

    ``training``: the training settings given as flags (None: not given; the rest come from the layers);
    ``options``: the method's own (see ``rdo_step``, ``cone_step``, ``repind_step`` in workflows/gradient.py).
    """
    settings = run_settings(check_run_dir(run_dir), {"training": training})  # milliseconds, before torch
    from refusal_atlas.workflows.gradient import cone_step, load_dim, rdo_step, repind_step, train_config

    load_dim(run_dir)  # bad input fails before the model is loaded
    train_config(settings.training, settings.data.seed)  # and bad optimizer settings
    from refusal_atlas.workflows.workspace import open_workspace

    ws = open_workspace(settings, run_dir, must_exist=True)
    step = {"rdo": rdo_step, "cone": cone_step, "repind": repind_step}[method]
    return ws, step(ws, settings.training, **options)


# --- train-edit ara -----------------------------------------------------------------------------------------
def parse_layers(text: str | None) -> list[int] | None:
    """``"8-18"`` (inclusive) or ``"8,10,12"`` → layer indices; None passes through."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, dash, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give a range (8-18) or comma-separated layers (8,10,12)") from None
    if not out:
        raise ConfigError(f"--layers {text!r} names no layer")
    return out


def train_edit(method: str, run_dir: Path, ara: dict[str, Any], *, name: str = "ara", adapter: Path | None = None,
               force: bool = False) -> tuple[Workspace, Any, dict[str, Any] | None]:
    """`train-edit ara`: train the ARA-style low-rank edit on the run → (workspace, edit, adapter summary).

    ``ara``: the [ara] settings given as flags (None: not given). Everything is checked against the run's
    manifest (layers and rank against its model's shape) before the model loads.
    """
    if method != "ara":
        raise ConfigError(f"unknown trained edit {method!r} (available: ara)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it names edits/<name>.json)")
    manifest = check_run_dir(run_dir)
    settings = run_settings(manifest, {"ara": ara})  # milliseconds, before torch
    model = manifest.get("model", {})
    if adapter is not None:
        from refusal_atlas.core.io import check_output_dir
        from refusal_atlas.workflows.validate import check_output_parent

        check_output_dir(adapter, force)
        check_output_parent(adapter, "adapter directory")
    from refusal_atlas.workflows.ara import ara_step, check_ara

    check_ara(settings.ara, settings.data.seed, model.get("n_layers"), model.get("d_model"))
    from refusal_atlas.workflows.workspace import open_workspace

    ws = open_workspace(settings, run_dir, must_exist=True)
    edit, summary = ara_step(ws, settings.ara, name=name, adapter_out=adapter, force=force)
    return ws, edit, summary


# --- search edits | subsets --------------------------------------------------------------------------------
def parse_budget(text: str | None, trials: int | None) -> tuple[int | None, float | None]:
    """--trials / --budget → (trials to reach, minutes); default: reach 30 trials."""
    if text is not None and trials is not None:
        raise ConfigError("give --trials or --budget, not both")
    if text is None:
        n = 30 if trials is None else trials
        if n < 1:
            raise ConfigError(f"--trials must be >= 1, got {n}")
        return n, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", text)
    if not m:
        raise ConfigError(f"--budget {text!r}: give a number of trials (30) or a time (20m, 90s, 1h)")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        if value != int(value) or value < 1:
            raise ConfigError(f"--budget {text!r}: a trial count must be a whole number >= 1")
        return int(value), None
    minutes = value * {"s": 1 / 60, "m": 1, "min": 1, "h": 60}[unit]
    if minutes <= 0:
        raise ConfigError(f"--budget {text!r} must be > 0")
    return None, minutes


_SEARCH_ALLOWED = ("n_val", "kl_threshold")  # run settings a search may change (validation size, pick rule)


def _open_search(run_dir: Path, overrides: dict[str, Any], storage: str | None) -> tuple[dict, Settings, str | None]:
    """The checks both searches start with, in milliseconds → (manifest, settings, checked storage)."""
    if storage is not None:
        from refusal_atlas.search.storage import check_storage

        storage = str(check_storage(storage))
    manifest = check_run_dir(run_dir)  # before anything heavy is imported
    check_at_least(n_val=(overrides.get("n_val"), 1))
    settings = run_settings(manifest, overrides)
    check_at_least(n_startup_trials=(settings.search.n_startup_trials, 0))
    return manifest, settings, storage


def search_edits(run_dir: Path, overrides: dict[str, Any], *, trials: int | None = None, budget: str | None = None,
                 storage: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """`search edits`: the edit search on a finished run, to ``trials`` (or ``budget``: trials or a time).

    ``overrides``: flag values as settings (``n_val``, ``kl_threshold``, ``{"search": {...}}``, e.g. ``verify``:
    how many proxy-front edits generation verifies, 0: none); ``dtype`` scores trials in another dtype (bfloat16: faster on CPUs with AVX512-BF16/AMX; the run keeps its own).
    """
    _, settings, storage = _open_search(run_dir, overrides, storage)
    until, minutes = parse_budget(budget, trials)
    search = settings.search
    check_at_least(score_tokens=(search.score_tokens, 0))
    if dtype is not None:
        from refusal_atlas.model.loading import resolve_dtype

        resolve_dtype(dtype, "cpu")  # an unknown name fails here, before the model loads
    if search.refusal_stat not in ("probability", "logodds"):  # search.trial.REFUSAL_STATS
        raise ConfigError(f"unknown --refusal-stat {search.refusal_stat!r}; choose probability or logodds")
    if search.max_kl is not None and not search.max_kl > 0:
        raise ConfigError(f"--max-kl must be > 0, got {search.max_kl}")
    from refusal_atlas.search.edit_space import EditSpace

    EditSpace(2, transforms=search.transforms)  # unknown or repeated --transforms fail before the model loads
    if search.router:  # read from the model's config.json, before the model loads
        check_moe_only("--router", check_model(settings.model.model, settings.model.chat_template))
    from refusal_atlas.evaluation.capability import parse_objectives

    objectives = parse_objectives(search.objectives)  # unknown, repeated or missing objectives too
    if search.verify > 0:
        check_judge(search.judge or settings.evaluation.judge)
    from refusal_atlas.workflows.search import check_sets, edit_search_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    check_sets(run_dir, search.sets, search.k_max)
    from refusal_atlas.search.study import check_objectives_match
    from refusal_atlas.workflows.search import edit_study_name

    check_objectives_match(storage or run_dir / "study.db", edit_study_name(search.sets), objectives)
    ws = open_workspace(settings, run_dir, must_exist=True, allowed=_SEARCH_ALLOWED, load_dtype=dtype)
    return edit_search_step(ws, load_prompt_sets(ws.settings), search, until=until, minutes=minutes, storage=storage)


def search_subsets(run_dir: Path, overrides: dict[str, Any], *, trials: int | None = None, budget: str | None = None,
                   storage: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`search subsets`: the SOM paper's subset search, then (``search.compare``) the held-out comparison with
    DIM → (search summary, comparison or None)."""
    manifest, settings, storage = _open_search(run_dir, overrides, storage)
    until, minutes = parse_budget(budget, trials)
    if minutes is not None:
        raise ConfigError("`search subsets` takes a trial budget (--trials N), not a time")
    search = settings.search
    check_at_least(k=(search.k, 1))
    check_at_least(k_max=(search.k_max, search.k))
    found = check_direction_file(run_dir / "directions" / f"{search.directions}.safetensors", manifest)
    if max(search.k, search.k_max or search.k) > found["k"]:
        raise ConfigError(f"--k {max(search.k, search.k_max or search.k)} but {search.directions} holds only "
                          f"{found['k']} directions; lower --k/--k-max or use a larger SOM")
    from refusal_atlas.workflows.som import compare_step, search_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    ws = open_workspace(settings, run_dir, must_exist=True, allowed=_SEARCH_ALLOWED)
    sets = load_prompt_sets(ws.settings)
    summary = search_step(ws, sets, search, until=until, storage=storage)
    return summary, compare_step(ws, sets) if search.compare else None


# --- compare -------------------------------------------------------------------------------------------------
def compare(run_dirs: list[Path], out: Path | None = None) -> tuple[str, list[Path]]:
    """`compare`: one Markdown table over the evaluated artifacts of ``run_dirs`` (and, with ``out``,
    compare.md + compare.json written there) → (the table, the files written)."""
    for d in run_dirs:
        check_run_dir(d)  # the same run-directory checks as every verb, before any work
    from refusal_atlas.core.io import write_text
    from refusal_atlas.workflows.compare import collect, to_json, to_markdown

    rows = collect(run_dirs)
    table = to_markdown(rows)
    if out is None:
        return table, []
    write_text(out / "compare.md", table)
    write_text(out / "compare.json", to_json(rows))
    return table, [out / "compare.md", out / "compare.json"]
