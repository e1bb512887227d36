"""Pluggable judges: ``substring`` (phrase lists), ``hf`` (local classifier or chat model) and
``endpoint`` (OpenAI-compatible server). All share :class:`Judge`'s batched interface."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.judges.base import (Judge, JudgeError, JudgeItem, Label, Role, Verdict, VerdictCache,
                                                  safe_name)
from refusal_atlas.evaluation.judges.endpoint import EndpointJudge, chat_completions_url
from refusal_atlas.evaluation.judges.hf import HFJudge
from refusal_atlas.evaluation.judges.substring import XSTEST_REFUSAL_PREFIXES, SubstringJudge

JUDGE_NAMES = ("substring", "hf", "endpoint")

__all__ = ["EndpointJudge", "HFJudge", "Judge", "JudgeError", "JudgeItem", "JudgeOptions", "Label", "Role",
           "SubstringJudge", "Verdict", "VerdictCache", "XSTEST_REFUSAL_PREFIXES", "JUDGE_NAMES", "check_judges", "make_judges"]


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
    api_key: str | None = None  # endpoint judge: a bearer token (the CLI reads $OPENAI_API_KEY)


def check_judges(names: list[str], opts: JudgeOptions) -> None:
    """Cheap checks of judge names and their required options (run before loading any model)."""
    unknown = [n for n in names if n not in JUDGE_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown judge(s) {unknown or names}; choose from {', '.join(JUDGE_NAMES)}")
    if "hf" in names and not opts.judge_model:
        raise ConfigError("the hf judge needs --judge-model (e.g. cais/HarmBench-Llama-2-13b-cls or embedded)")
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
        elif name == "hf":
            assert opts.judge_model is not None
            cache = _cache(opts, f"hf__{safe_name(opts.judge_model)}")
            if reuse and opts.judge_model in reuse:
                model, tok, label = reuse[opts.judge_model]
                judges.append(HFJudge(model, tok, label, cache_path=cache))
            else:
                judges.append(HFJudge.load(opts.judge_model, device=opts.device, cache_path=cache))
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
