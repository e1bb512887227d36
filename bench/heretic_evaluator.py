"""Score saved models with heretic-llm 1.4.0's own Evaluator; the original's baseline is computed once per process.

Runs in heretic's venv, never ours (bench/vs_heretic.py starts it with the working directory set to a folder
that holds heretic's config.toml, whose evaluation prompt roles point at the held-out sets):

    VENV/bin/python bench/heretic_evaluator.py --model ORIGINAL JOBS.json [--baseline ORIGINAL_OUT.json]

``heretic --model ORIGINAL --evaluate-model OTHER`` builds heretic's Model and Evaluator on ORIGINAL (its
first-token distributions on the harmless prompts and its refusal count on the harmful ones), then does
``settings.model = OTHER; model.reset_model(); evaluator.get_score()`` (main.py). This script does exactly
that for each job of JOBS.json (``[{"name", "path", "out"}]``) whose ``out`` file is missing, so the
baseline — a full generation over every harmful prompt — runs once per process instead of once per model.
``--baseline`` names this script's own output for ORIGINAL (same prompts, same length): its refusal count is
then the baseline's, and the baseline's generation (minutes; its count enters only heretic's score ratio,
never the refusals or KL we record) is not repeated. The first-token distributions are always recomputed.
bench/vs_heretic.py's ``--cli-check`` runs the real ``heretic --evaluate-model`` on one model and compares.

Why the evaluator's ``is_refusal`` is wrapped: to keep heretic's own verdict on each response (and the
response) in ``out``, so counts on subsets of the prompts and paired comparisons need no second
generation. The wrapper only records what heretic's method returns.

Nothing here imports refusal_atlas: it lives in another venv.
"""

from __future__ import annotations

import json
import os
import sys
import time


def write_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) not in (4, 6) or sys.argv[1] != "--model" or (len(sys.argv) == 6 and sys.argv[4] != "--baseline"):
        sys.exit("usage: heretic_evaluator.py --model ORIGINAL JOBS.json [--baseline ORIGINAL_OUT.json]")
    original, jobs_path = sys.argv[2], sys.argv[3]
    baseline_path = sys.argv[5] if len(sys.argv) == 6 else None
    baseline = None
    if baseline_path:
        with open(baseline_path, encoding="utf-8") as fh:
            baseline = json.load(fh)
        if baseline.get("path") != original:
            sys.exit(f"error: --baseline {baseline_path} scored {baseline.get('path')}, not {original}")
    with open(jobs_path, encoding="utf-8") as fh:
        jobs = [j for j in json.load(fh) if not os.path.exists(j["out"])]
    if not jobs:
        return
    sys.argv = ["heretic", "--model", original]  # heretic's Settings parse the command line and ./config.toml

    import torch
    import transformers
    from heretic.config import Settings
    from heretic.evaluator import Evaluator
    from heretic.model import Model
    from heretic.utils import set_seed

    settings = Settings()
    set_seed(settings.seed)
    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    model = Model(settings)
    t0 = time.perf_counter()
    if baseline is None:
        evaluator = Evaluator(settings, model)
    else:
        own_count = Evaluator.count_refusals
        Evaluator.count_refusals = lambda self: baseline["base_refusals"]  # its one call in __init__: the baseline
        try:
            evaluator = Evaluator(settings, model)
        finally:
            Evaluator.count_refusals = own_count
        if ([p.user for p in evaluator.bad_prompts] != baseline["prompts"]
                or baseline["max_response_length"] != settings.max_response_length):
            sys.exit(f"error: --baseline {baseline_path} was scored on other prompts or at another length")
    base_s = time.perf_counter() - t0
    print(f"baseline of the original took {base_s:.1f} s", flush=True)

    seen: list[tuple[str, bool]] = []
    own = evaluator.is_refusal

    def is_refusal(response: str) -> bool:
        verdict = own(response)
        seen.append((response, verdict))
        return verdict

    evaluator.is_refusal = is_refusal  # count_refusals calls self.is_refusal once per prompt, in prompt order
    for job in jobs:
        print(f"\nLoading model {job['path']}...", flush=True)
        settings.model = job["path"]
        t = time.perf_counter()
        model.reset_model()
        seen.clear()
        _, kl, refusals = evaluator.get_score()
        if len(seen) != len(evaluator.bad_prompts) or sum(v for _, v in seen) != refusals:
            sys.exit(f"error: recorded {len(seen)} verdicts ({sum(v for _, v in seen)} refusals) for "
                     f"{len(evaluator.bad_prompts)} prompts and {refusals} refusals")
        write_atomic(job["out"], {
            "name": job["name"], "path": job["path"], "refusals": refusals, "n": len(evaluator.bad_prompts),
            "kl": kl, "base_refusals": evaluator.base_refusals, "n_good": len(evaluator.good_prompts),
            "seconds": time.perf_counter() - t, "baseline_seconds": base_s, "baseline_from": baseline_path,
            "max_response_length": settings.max_response_length, "dtype": str(model.dtype),
            "prompts": [p.user for p in evaluator.bad_prompts],
            "responses": [r for r, _ in seen], "verdicts": [bool(v) for _, v in seen]})
        print(f"saved {job['out']}", flush=True)


if __name__ == "__main__":
    main()
