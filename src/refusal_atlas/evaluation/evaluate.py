"""Held-out evaluation of interventions: generate, judge, measure damage, record.

Each (dataset, intervention) pair yields one record for metrics.json with the refusal rate, its
n and 95% interval, and, where asked, the next-token KL against the unmodified model on the same
prompts. Completions are saved as JSONL beside the metrics, so any judge can re-read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from refusal_atlas.data import Prompt
from refusal_atlas.evaluation.damage import next_token_kl
from refusal_atlas.evaluation.refusal import is_refusal, next_token_logprobs
from refusal_atlas.evaluation.stats import rate_record
from refusal_atlas.generation import generate
from refusal_atlas.interventions import Intervention
from refusal_atlas.io import write_text
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter


def _save_completions(path: Path, prompts: Sequence[Prompt], responses: Sequence[str], verdicts: Sequence[bool]):
    import json

    lines = [json.dumps({"instruction": p.instruction, "category": p.category, "response": r, "refusal": v})
             for p, r, v in zip(prompts, responses, verdicts)]
    write_text(path, "\n".join(lines) + "\n")


def evaluate_refusal(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    prompts: Sequence[Prompt],
    dataset: str,
    intervention: Intervention,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    completions_path: Path | None = None,
) -> dict:
    """Generate greedily under ``intervention`` and judge refusal by substring → one record."""
    instructions = [p.instruction for p in prompts]
    responses = generate(adapter, chat, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         intervention=intervention, desc=f"generate {dataset} [{intervention.label}]")
    verdicts = [is_refusal(r) for r in responses]
    if completions_path is not None:
        _save_completions(completions_path, prompts, responses, verdicts)
    stats = rate_record(sum(verdicts), len(verdicts))
    return {
        **intervention.describe(),
        "dataset": dataset,
        "judge": "substring",
        "n": stats["n"],
        "refusal_rate": stats["rate"],
        "ci95": stats["ci95"],
        "empty_responses": sum(1 for r in responses if not r.strip()),
        "max_new_tokens": max_new_tokens,
    }


def evaluate_kl(
    adapter: ModelAdapter,
    chat: ChatFormatter,
    prompts: Sequence[Prompt],
    intervention: Intervention,
    base_logprobs=None,
    batch_size: int = 16,
) -> tuple[float, object]:
    """Mean next-token KL(base ‖ intervened) over the prompts; returns (kl, base_logprobs) for reuse."""
    instructions = [p.instruction for p in prompts]
    if base_logprobs is None:
        base_logprobs = next_token_logprobs(adapter, chat, instructions, batch_size=batch_size)
    if intervention.kind == "none":
        return 0.0, base_logprobs
    new = next_token_logprobs(adapter, chat, instructions, batch_size=batch_size, intervention=intervention,
                              desc=f"KL [{intervention.label}]")
    return float(next_token_kl(base_logprobs, new).mean()), base_logprobs
