"""Pluggable judges: ``substring`` (phrase lists), ``markers`` (heretic-llm's rule), ``meaning`` (sentence
embeddings + a trained head: refusal / deflection / compliance / broken, offline), ``hf`` (local classifier
or chat model) and ``endpoint`` (OpenAI-compatible server). All share :class:`Judge`'s batched interface.

``logit`` is a name, not a judge here: the first-token refusal probability reads the model under an
edit, not a response text, so only callers that hold the model and the edit compute it
(``refusal-atlas judge accuracy --run-dir``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.judges.base import (BINARY_LABELS, FOUR_LABELS, Judge, JudgeError, JudgeItem, Label,
                                                  Role, Verdict, VerdictCache, judge_labels, safe_name, verdict_name)
from refusal_atlas.evaluation.judges.endpoint import EndpointJudge, chat_completions_url
from refusal_atlas.evaluation.judges.hf import HFJudge
from refusal_atlas.evaluation.judges.markers import HERETIC_REFUSAL_MARKERS, MarkersJudge
from refusal_atlas.evaluation.judges.substring import XSTEST_REFUSAL_PREFIXES, SubstringJudge

JUDGE_NAMES = ("substring", "markers", "meaning", "hf", "endpoint")
LOGIT_EXPLAINED = ("the logit judge reads the model's first-token refusal probability under an edit, not a response "
                   "text, so it cannot judge a file of responses: `refusal-atlas evaluate -r RUN` generates and judges "
                   "under a run's edits, and `refusal-atlas judge accuracy LABELLED.jsonl --judge logit --run-dir RUN` "
                   "scores a labelled set made from RUN")

__all__ = ["BINARY_LABELS", "EndpointJudge", "FOUR_LABELS", "HERETIC_REFUSAL_MARKERS", "HFJudge", "Judge", "JudgeError",
           "JudgeItem", "JudgeOptions", "Label", "LOGIT_EXPLAINED", "MarkersJudge", "Role", "SubstringJudge", "Verdict",
           "VerdictCache", "XSTEST_REFUSAL_PREFIXES", "JUDGE_NAMES", "check_judges", "judge_labels", "make_judges",
           "verdict_name"]


@dataclass
class JudgeOptions:
    """Settings for building judges; ``cache_dir`` (in the run directory) holds verdict caches."""

    cache_dir: Path | None = None
    judge_model: str | None = None
    endpoint_url: str | None = None
    endpoint_model: str | None = None
    endpoint_rubric: str = "strongreject"
    concurrency: int = 8
    timeout: float = 60.0
    max_tries: int = 5
    device: str | None = None
    judge_threshold: float | None = None  # hf judge: complied when P(complied answer) share >= this (None: argmax)
    meaning_head: Path | None = None  # meaning judge: a head other than the shipped one (meaning_head.safetensors)
    api_key: str | None = None  # endpoint judge: a bearer token (the CLI reads $OPENAI_API_KEY)


def check_judges(names: list[str], opts: JudgeOptions) -> None:
    """Cheap checks of judge names and their required options (run before loading any model)."""
    if "logit" in names:
        raise ConfigError(LOGIT_EXPLAINED)
    unknown = [n for n in names if n not in JUDGE_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown judge(s) {unknown or names}; choose from {', '.join(JUDGE_NAMES)}")
    if "hf" in names and not opts.judge_model:
        raise ConfigError("the hf judge needs --judge-model (e.g. cais/HarmBench-Llama-2-13b-cls or embedded)")
    if opts.judge_threshold is not None and not 0.0 < opts.judge_threshold < 1.0:
        raise ConfigError(f"--judge-threshold must be in (0, 1), got {opts.judge_threshold}")
    if "meaning" in names:
        from refusal_atlas.evaluation.judges.embedding import bundled_model_dir
        from refusal_atlas.evaluation.judges.meaning import check_head

        check_head(opts.meaning_head)
        bundled_model_dir()
    if "endpoint" in names:
        if not opts.endpoint_url:
            raise ConfigError("the endpoint judge needs --endpoint-url (e.g. http://127.0.0.1:8000/v1)")
        chat_completions_url(opts.endpoint_url)
        if opts.endpoint_rubric not in ("strongreject", "harmbench"):
            raise ConfigError(f"unknown rubric {opts.endpoint_rubric!r}; choose strongreject or harmbench")
        if not opts.endpoint_model:
            raise ConfigError("the endpoint judge needs --endpoint-model, the model name the server serves")


def make_judges(names: list[str], opts: JudgeOptions, reuse: dict | None = None) -> list[Judge]:
    """Build judges by name, validating everything (model exists, endpoint reachable) up front.

    ``reuse`` maps a model spec to an already loaded (model, tokenizer, name), so judging a model
    with itself does not load it twice.
    """
    check_judges(names, opts)
    judges: list[Judge] = []
    for name in dict.fromkeys(names):
        if name == "substring":
            judges.append(SubstringJudge())
        elif name == "markers":
            judges.append(MarkersJudge())
        elif name == "meaning":
            from refusal_atlas.evaluation.judges.meaning import MeaningJudge

            judges.append(MeaningJudge.load(opts.meaning_head, device=opts.device))
        elif name == "hf":
            assert opts.judge_model is not None
            cache = _cache(opts, f"hf__{safe_name(opts.judge_model)}")
            if reuse and opts.judge_model in reuse:
                model, tok, label = reuse[opts.judge_model]
                judges.append(HFJudge(model, tok, label, cache_path=cache, threshold=opts.judge_threshold))
            else:
                judges.append(HFJudge.load(opts.judge_model, device=opts.device, cache_path=cache,
                                           threshold=opts.judge_threshold))
        else:
            assert opts.endpoint_url is not None
            judge = EndpointJudge(opts.endpoint_url, opts.endpoint_model or "",
                                  harmful_rubric=opts.endpoint_rubric, concurrency=opts.concurrency,
                                  timeout=opts.timeout, max_tries=opts.max_tries, api_key=opts.api_key,
                                  cache_path=_cache(opts, f"endpoint__{safe_name(opts.endpoint_model or '')}"))
            judge.check_reachable()
            judges.append(judge)
    return judges


def _cache(opts: JudgeOptions, stem: str) -> Path | None:
    return opts.cache_dir / f"{stem}.jsonl" if opts.cache_dir is not None else None
