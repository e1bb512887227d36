"""Held-out measurements for the gradient methods of a run directory; appends records to metrics.json.

    flock /tmp/refusal_atlas_cpu.lock nice -n 10 .venv/bin/python scripts/measure_gradient.py \
        --run-dir R --what rdo [cone] [repind]

* rdo: JailbreakBench refusal rate (substring, greedy, the run's n_eval and max_new_tokens) under
  ablation of R/directions/rdo, next to DIM's (recomputed if metrics.json lacks it); next-token
  KL on harmless_test for both; logit refusal scores for baseline / DIM / RDO.
* cone: logit refusal score on JailbreakBench prompts under ablation of N cone samples and each
  basis vector vs ``--n-random`` random unit directions; then generation refusal rates for the
  worst cone sample and the best random direction.
* repind: cross-ablation cosine change with DIM (layers < 0.9·L, last token, JailbreakBench
  prompts) for repind vs rdo_orth, plus their ablation refusal scores and JailbreakBench refusal
  rate for repind.
Nothing here is trained on or selected with JailbreakBench or harmless_test.
"""

from __future__ import annotations

import argparse
import json
import time


from refusal_atlas.data import load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.cone import cone_eval_directions, evaluate_cone
from refusal_atlas.directions.repind import cross_ablation_change
from refusal_atlas.evaluation.evaluate import evaluate_kl, evaluate_refusal
from refusal_atlas.evaluation.refusal import mean_refusal_score
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.workflows.workspace import reopen_workspace


def mean_score(ws, prompts, spec=None) -> float:
    return mean_refusal_score(ws.adapter, ws.chat, prompts, ws.refusal_ids, spec, ws.settings.model.batch_size)


def gen_record(ws, prompts, dataset, spec):
    return evaluate_refusal(ws.adapter, ws.chat, prompts, dataset, spec, max_new_tokens=ws.settings.evaluation.max_new_tokens,
                            batch_size=ws.settings.model.batch_size, completions_path=ws.run.completions_path(dataset, spec.label))


def measure_rdo(ws, out: dict) -> list[dict]:
    cfg, run = ws.settings, ws.run
    dim, rdo = DirectionSet.load(run.direction_path("dim")), DirectionSet.load(run.direction_path("rdo"))
    jbb = load_prompts("jailbreakbench", n=cfg.evaluation.n_eval, seed=cfg.data.seed)
    harmless = load_prompts(cfg.evaluation.eval_harmless, n=cfg.evaluation.n_eval, seed=cfg.data.seed)
    records = []
    t = time.perf_counter()
    rec = gen_record(ws, jbb, "jailbreakbench", DirectionalAblation.from_directions(rdo))
    rec["train_meta"] = {k: rdo.meta.get(k) for k in ("best_step", "stopped", "init", "cos_with_dim")}
    records.append(rec)
    dim_rec = next((r for r in run.metrics() if r.get("intervention") == "ablate:dim"
                    and r.get("dataset") == "jailbreakbench" and r.get("n") == cfg.evaluation.n_eval
                    and r.get("max_new_tokens") == cfg.evaluation.max_new_tokens), None)
    if dim_rec is None:
        dim_rec = gen_record(ws, jbb, "jailbreakbench", DirectionalAblation.from_directions(dim))
        records.append(dim_rec)
    base = next((r for r in run.metrics() if r.get("intervention") == "none" and r.get("dataset") == "jailbreakbench"),
                None)
    out["rdo_generation_s"] = round(time.perf_counter() - t, 1)
    base_lp = None
    kls = {}
    for name, d in (("dim", dim), ("rdo", rdo)):
        kls[name], base_lp = evaluate_kl(ws.adapter, ws.chat, harmless, DirectionalAblation.from_directions(d), base_lp,
                                         cfg.model.batch_size)
        records.append({"intervention": f"ablate:{name}", "kind": "ablate", "method": name, "layer": d.layer,
                        "dataset": cfg.evaluation.eval_harmless, "judge": "none", "metric": "next_token_kl", "n": len(harmless),
                        "kl": kls[name]})
    texts = [p.instruction for p in jbb]
    scores = {"none": mean_score(ws, texts), "dim": mean_score(ws, texts, DirectionalAblation.from_directions(dim)),
              "rdo": mean_score(ws, texts, DirectionalAblation.from_directions(rdo))}
    records.append({"intervention": "logit:jbb", "dataset": "jailbreakbench", "judge": "logit_refusal_score",
                    "metric": "mean_refusal_score", "n": len(texts), "scores": scores})
    out["rdo"] = {"jbb_refusal_rate": {"baseline": base and base["refusal_rate"], "dim": dim_rec["refusal_rate"],
                                       "rdo": rec["refusal_rate"]},
                  "jbb_ci95": {"dim": dim_rec["ci95"], "rdo": rec["ci95"]},
                  "harmless_test_kl": kls, "jbb_mean_refusal_score": scores, "n": cfg.evaluation.n_eval,
                  "cos_rdo_dim": float(rdo.unit()[0] @ dim.unit()[0])}
    return records


def measure_cone(ws, out: dict, n_prompts: int, n_samples: int, n_random: int) -> list[dict]:
    cfg, run = ws.settings, ws.run
    cone = DirectionSet.load(run.direction_path("cone"))
    prompts = load_prompts("jailbreakbench", n=n_prompts, seed=cfg.data.seed)
    texts = [p.instruction for p in prompts]
    rep = evaluate_cone(ws.adapter, ws.chat, cone, texts, ws.refusal_ids, n_samples=n_samples, n_random=n_random,
                        seed=42, batch_size=cfg.model.batch_size)
    samples, rand = cone_eval_directions(cone.unit(), n_samples, n_random, seed=42)
    rand_scores, base = rep["random_scores"], rep["baseline_score"]
    worst = int(max(range(n_samples), key=lambda i: rep["sample_scores"][i]))
    best_rand = int(min(range(n_random), key=lambda i: rand_scores[i]))
    worst_spec = DirectionalAblation.from_directions(samples[worst].reshape(1, -1),
                                                     label=f"ablate:cone[k={len(cone)}]:worst_sample")
    rand_spec = DirectionalAblation.from_directions(rand[best_rand].reshape(1, -1), label="ablate:random:best_of_n")
    recs = [gen_record(ws, prompts, "jailbreakbench", worst_spec), gen_record(ws, prompts, "jailbreakbench", rand_spec)]
    beat = max(rep["sample_scores"]) < min(rand_scores)
    summary = {"k": len(cone), "n_prompts": n_prompts, "baseline_score": base, "samples": rep,
               "random_scores": rand_scores, "all_samples_beat_every_random": beat,
               "worst_sample_refusal_rate": recs[0]["refusal_rate"], "best_random_refusal_rate": recs[1]["refusal_rate"],
               "best_step": cone.meta.get("best_step"), "stopped": cone.meta.get("stopped")}
    out["cone"] = summary
    recs.append({"intervention": f"ablate:cone[k={len(cone)}]:samples", "dataset": "jailbreakbench",
                 "judge": "logit_refusal_score", "metric": "mean_refusal_score_distribution", "n": n_prompts,
                 **{k: summary[k] for k in ("k", "baseline_score", "random_scores", "all_samples_beat_every_random")},
                 "min": rep["min"], "median": rep["median"], "max": rep["max"], "sample_scores": rep["sample_scores"],
                 "basis_scores": rep["basis_scores"]})
    return recs


def measure_repind(ws, out: dict, n_prompts: int) -> list[dict]:
    cfg, run = ws.settings, ws.run
    dim = DirectionSet.load(run.direction_path("dim"))
    texts = [p.instruction for p in load_prompts("jailbreakbench", n=n_prompts, seed=cfg.data.seed)]
    summary, recs = {"n_prompts": n_prompts}, []
    for name in ("repind", "rdo_orth", "rdo"):
        if not run.direction_path(name).exists():
            continue
        d = DirectionSet.load(run.direction_path(name))
        change = cross_ablation_change(ws.adapter, ws.chat, d.unit()[0], dim.unit()[0], texts,
                                       batch_size=cfg.model.batch_size)
        score = mean_score(ws, texts, DirectionalAblation.from_directions(d.select([d.ids[0]])))
        summary[name] = {"independence_loss": change["loss"], "mean_abs_cos_change": change["mean_abs_change"],
                         "ablation_refusal_score": score, "cos_with_dim": float(d.unit()[0] @ dim.unit()[0]),
                         "dim_under_ablation": change["v_under_r_ablation"],
                         "direction_under_dim_ablation": change["r_under_v_ablation"]}
        recs.append({"intervention": f"ablate:{name}", "dataset": "jailbreakbench", "judge": "cosine",
                     "metric": "cross_ablation_with_dim", "n": n_prompts, **summary[name]})
    summary["baseline_score"] = mean_score(ws, texts)
    rep = DirectionSet.load(run.direction_path("repind"))
    jbb = load_prompts("jailbreakbench", n=cfg.evaluation.n_eval, seed=cfg.data.seed)
    recs.append(gen_record(ws, jbb, "jailbreakbench", DirectionalAblation.from_directions(rep.select([rep.ids[0]]))))
    summary["repind_jbb_refusal_rate"] = recs[-1]["refusal_rate"]
    out["repind"] = summary
    return recs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--what", nargs="+", choices=["rdo", "cone", "repind"], required=True)
    ap.add_argument("--n-prompts", type=int, default=50, help="JailbreakBench prompts for the logit/cosine checks")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--n-random", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the summary JSON here")
    args = ap.parse_args()
    ws = reopen_workspace(args.run_dir)
    out: dict = {}
    for what in args.what:
        t = time.perf_counter()
        if what == "rdo":
            recs = measure_rdo(ws, out)
        elif what == "cone":
            recs = measure_cone(ws, out, args.n_prompts, args.n_samples, args.n_random)
        else:
            recs = measure_repind(ws, out, args.n_prompts)
        ws.run.add_metrics(recs)
        out[f"{what}_seconds"] = round(time.perf_counter() - t, 1)
    text = json.dumps(out, indent=2, default=float)
    print(text)
    if args.out:
        from refusal_atlas.core.io import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
