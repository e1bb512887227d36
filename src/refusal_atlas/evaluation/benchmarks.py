"""Capability benchmarks through lm-eval (optional extra ``bench``), with an intervention active.

The loaded model instance is wrapped in lm-eval's ``HFLM`` and evaluated inside the intervention's
context, so hooks (ablation, ActAdd) act on every scoring pass; an exported, orthogonalized model
is just another model instance with intervention "none".

Task names: lm-eval's own (``truthfulqa_mc2``, ``arc_challenge``, ``mmlu_<subject>``, ``gsm8k``, ...;
these download data from the Hugging Face hub), the short aliases below, the bundled offline task
``smoke`` (20 multiple-choice questions written for this project), or a path to a task YAML whose
``data_files`` are resolved relative to the YAML. Every result becomes a metrics record with n and a
95% interval computed from the per-item scores (Wilson for 0/1 scores, bootstrap otherwise).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from refusal_atlas.core.errors import ConfigError, DataError
from refusal_atlas.evaluation.stats import mean_record, rate_record

ALIASES = {"smoke": "refusal_atlas_smoke", "truthfulqa": "truthfulqa_mc2", "arc": "arc_challenge",
           "mmlu": "mmlu", "gsm8k": "gsm8k"}
PRIMARY = ("acc", "exact_match", "acc_norm", "mc2")  # first one present is the record's rate


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("capability benchmarks need lm-eval: pip install 'refusal-atlas[bench]'") from None
    return lm_eval, HFLM, TaskManager


def local_task_dir() -> Path:
    return Path(str(files("refusal_atlas.evaluation") / "lm_tasks"))


def yaml_task(path: str | Path) -> dict:
    """A task YAML as an lm-eval config dict, its relative ``data_files`` made absolute."""
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read task file {path}: {exc}") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise ConfigError(f"task file {path} must be a YAML mapping with a 'task' key")
    files_ = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files_, dict):
        resolved = {k: str((path.parent / v).resolve()) for k, v in files_.items()}
        for split, f in resolved.items():
            if not Path(f).is_file():
                raise DataError(f"task {cfg['task']!r}: data file for split {split!r} not found: {f}")
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolved}
    return cfg


def resolve_tasks(names: Sequence[str]) -> tuple[list[str | dict], bool]:
    """Task specs for lm-eval → (specs, needs lm-eval's built-in registry)."""
    specs: list[str | dict] = []
    builtin = False
    for raw in names:
        name = ALIASES.get(raw, raw)
        local = local_task_dir() / f"{name}.yaml"
        if raw.endswith((".yaml", ".yml")):
            specs.append(yaml_task(raw))
        elif local.is_file():
            specs.append(yaml_task(local))
        else:
            specs.append(name)
            builtin = True
    return specs, builtin


def check_tasks(tasks: Sequence[str]):
    """Resolve ``tasks`` and check lm-eval knows each (no model needed) → (specs, lm-eval TaskManager)."""
    _, _, TaskManager = _lm_eval()
    specs, builtin = resolve_tasks(tasks)
    manager = TaskManager(include_defaults=builtin)
    unknown = [s for s in specs if isinstance(s, str) and s not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}; use lm-eval task names, a task YAML path, or "
                          f"one of the aliases {', '.join(sorted(ALIASES))}")
    return specs, manager


def run_benchmarks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    adapter=None,
    intervention=None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> list[dict]:
    """Run lm-eval ``tasks`` on ``model`` (under ``intervention`` if given) → metrics records."""
    if not tasks:
        return []
    lm_eval, HFLM, _ = _lm_eval()
    specs, manager = check_tasks(tasks)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    context = intervention.apply(adapter) if intervention is not None else contextlib.nullcontext()
    try:
        with context:
            out = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot,
                                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    except (ConnectionError, FileNotFoundError) as exc:
        raise DataError(f"lm-eval could not load a benchmark data set ({str(exc).splitlines()[0]}); built-in "
                        "tasks download from the Hugging Face hub: run with network, pre-populate the datasets "
                        "cache, or use the offline 'smoke' task") from None
    return benchmark_records(out, limit=limit, num_fewshot=num_fewshot, version=getattr(lm_eval, "__version__", "?"))


def _item_scores(samples: list[dict], metric: str) -> list[float]:
    return [float(s[metric]) for s in samples if isinstance(s.get(metric), (int, float, bool))]


def _gold_loglik(samples: list[dict]) -> float | None:
    """Mean log-likelihood of the gold choice (multiple-choice tasks): moves even when acc does not."""
    vals = []
    for s in samples:
        resps, target = s.get("filtered_resps"), s.get("target")
        if isinstance(target, int) and isinstance(resps, list) and 0 <= target < len(resps):
            first = resps[target]
            if isinstance(first, (list, tuple)) and first and isinstance(first[0], float):
                vals.append(first[0])
    return sum(vals) / len(vals) if vals else None


def benchmark_records(out: dict, limit=None, num_fewshot=None, version: str = "?") -> list[dict]:
    """One record per leaf task: the primary metric as a rate with n and a 95% interval."""
    records = []
    for task, samples in (out.get("samples") or {}).items():
        filt = samples[0].get("filter") if samples else None
        samples = [s for s in samples if s.get("filter") == filt]  # one filter (e.g. gsm8k strict-match)
        results = out["results"].get(task, {})
        values = {k.split(",")[0] + ("" if k.endswith(",none") else "," + k.split(",", 1)[1]): v
                  for k, v in results.items() if "," in k and "stderr" not in k and isinstance(v, (int, float))}
        metric = next((m for m in PRIMARY if _item_scores(samples, m)), None)
        if metric is None:
            continue
        scores = _item_scores(samples, metric)
        if all(x in (0.0, 1.0) for x in scores):
            stats = rate_record(int(sum(scores)), len(scores))
        else:
            m = mean_record(scores)
            stats = {"n": m["n"], "rate": m["mean"], "ci95": m["ci95"]}
        rec = {"dataset": task, "judge": "lm-eval", "metric": f"benchmark:{metric}", **stats,
               "values": values, "filter": filt, "limit": limit, "num_fewshot": num_fewshot, "lm_eval": version}
        gold = _gold_loglik(samples)
        if gold is not None:
            rec["gold_loglik_mean"] = gold
        records.append(rec)
    return records
