"""The parts of the report that explain a run rather than plot it.

Definitions of the scores, a "how this run was made" block read from the manifest and the
activation file, example completions side by side (behind a content warning), and one table that
puts every method's held-out rows next to each other. report.py assembles them with the plots.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from refusal_atlas.core.rundir import RunDir, recorded_settings

EXAMPLES_PER_DATASET = 3
EXAMPLE_CHARS = 280

DEFINITIONS = """<h2>Definitions</h2><dl class="defs">
<dt>refusal score</dt><dd>log-odds of a refusal start: p is the total next-token probability of the refusal-start
tokens (the single-token encodings of “I” and “As”) at the last prompt position, score = log p − log(1 − p).
One forward pass per prompt; &gt; 0 means the model more likely starts a refusal. Used to filter train prompts,
select directions and search.</dd>
<dt>refusal rate</dt><dd>fraction of held-out prompts whose greedy completion a judge calls a refusal, with a 95%
Wilson interval; every rate names its judge and its generation length (max_new_tokens). Substring judge: Arditi et
al.'s refusal phrases anywhere in the response. Judges that read meaning (meaning) also count
<em>deflections</em> (an answer to something other than what was asked, or its opposite) and broken text: those
are shown beside the refusal rate and never counted in it. 64 tokens is the shortest length at which no verdict
differed from 256 tokens on the project's own measurement.</dd>
<dt>KL</dt><dd>mean over harmless prompts of KL(P<sub>base</sub> ‖ P<sub>edited</sub>) of the next-token
distribution at the last prompt position, in nats; how much an edit changes the model where it should change
nothing. The selection's KL filter uses the same quantity on validation prompts.</dd>
<dt>layer l</dt><dd>the input of decoder block l (resid_pre); positions count from the end of the prompt
(−1 = last post-instruction token).</dd></dl>"""


def concept_note(manifest: dict[str, Any]) -> str:
    """Runs of `refusal-atlas concept` reuse the refusal columns: say what they mean there."""
    concept = manifest.get("concept")
    if not isinstance(concept, dict):
        return ""
    markers = ", ".join(repr(m) for m in concept.get("markers", []))
    return (f"<p class='note'><b>Concept run: {html.escape(str(concept.get('name')))}.</b> Here “refusal” means the "
            f"concept: positive prompts play the harmful role, negative prompts the harmless one; the refusal "
            f"score is the log-odds of the start words {html.escape(', '.join(concept.get('start_words', [])))} as "
            f"the next token, and the rate is the fraction of completions containing a marker "
            f"({html.escape(markers)}).</p>")


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
            return f"[{v[0]:.2f}, {v[1]:.2f}]"
        if isinstance(v, dict):  # e.g. a meaning judge's four counts
            return html.escape(", ".join(f"{k} {x}" for k, x in v.items()))
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _activation_counts(path: Path) -> dict[str, int]:
    """Prompts per set in activations.safetensors, read from the header only (no tensors loaded)."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("json") or "{}")
    return {name: m["n"] for name, m in meta.items() if isinstance(m, dict) and "n" in m}


def _train_counts(manifest: dict, cfg: dict, kept: dict[str, int]) -> str:
    recorded = manifest.get("train_counts") or {}
    parts = []
    for role in ("harmful", "harmless"):
        sampled = recorded.get(role, {}).get("sampled", cfg.get("n_train"))
        after = recorded.get(role, {}).get("kept", kept.get(role))
        parts.append(f"{role} {after if after is not None else '?'} of {sampled}")
    how = ("kept by the refusal filter (harmful: score > 0, harmless: score < 0)" if cfg.get("filter_train", True)
           else "no refusal filter")
    return f"{', '.join(parts)} ({how})"


def _model_line(model: dict) -> str:
    sha = model.get("gguf_sha256") or model.get("sha") or model.get("revision") or model.get("commit")
    parts = [str(model.get("name")), f"source {model.get('source')}", f"{model.get('n_layers')} layers",
             f"d_model {model.get('d_model')}", f"dtype {model.get('dtype')}", f"device {model.get('device')}"]
    parts.append(f"sha256 {sha}" if sha else "sha: not recorded (local directory or hub id)")
    return " · ".join(parts)


def provenance_section(run: RunDir, manifest: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    """The "how this run was made" block: enough to reproduce or to judge the numbers."""
    cfg, model = recorded_settings(manifest), manifest.get("model", {})
    eval_n = {}
    for r in metrics:
        if "refusal_rate" in r and r.get("dataset"):
            eval_n.setdefault(r["dataset"], r.get("n"))
    judges = sorted({str(r["judge"]) for r in metrics if r.get("judge") and "refusal_rate" in r}) or ["substring"]
    lengths = sorted({int(r["max_new_tokens"]) for r in metrics if "refusal_rate" in r and r.get("max_new_tokens")})
    timings = manifest.get("timings_s") or {}
    versions = {"refusal_atlas": manifest.get("refusal_atlas"), **(manifest.get("versions") or {})}
    rows = [
        ("model", _model_line(model)),
        ("train prompts", f"{cfg.get('harmful_train')} / {cfg.get('harmless_train')}: "
                          + _train_counts(manifest, cfg, _activation_counts(run / "activations.safetensors"))),
        ("validation prompts", f"{cfg.get('n_val')} each of {cfg.get('harmful_val')} / {cfg.get('harmless_val')}"),
        ("held-out prompts", ", ".join(f"{k} n={v}" for k, v in eval_n.items()) or f"n_eval {cfg.get('n_eval')}"),
        ("positions", str(cfg.get("positions") if cfg.get("positions") is not None else "all post-instruction")),
        ("layers", str(cfg.get("layers") if cfg.get("layers") is not None else "floor(L/3) .. 0.8·L")
                   + (f"; fixed layer {cfg['layer']}" if cfg.get("layer") is not None else "")),
        ("selection filters", f"KL ≤ {cfg.get('kl_threshold')}, steering ≥ {cfg.get('induce_threshold')}, last "
                              f"{cfg.get('prune_layer_frac')} of layers pruned, strict={cfg.get('strict_filters')}"),
        ("generation", f"greedy, max_new_tokens {cfg.get('max_new_tokens')}"
                       + (f" (rates read at {', '.join(map(str, lengths))} tokens)" if lengths else "")
                       + f", batch {cfg.get('batch_size')}, "
                       f"system prompt {cfg.get('system_prompt')!r} (None: the template's default)"),
        ("judge", ", ".join(judges)),
        ("KL", "next-token KL(P_base ‖ P_edited) at the last prompt position, mean over harmless prompts, nats"),
        ("ablation mode", str(cfg.get("ablation_mode"))),
        ("seed", str(cfg.get("seed"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("step timings", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if isinstance(v, (int, float)))
                         + (f" (total {sum(v for v in timings.values() if isinstance(v, (int, float))):.1f} s)"
                            if timings else "not recorded")),
        ("created / status", f"{manifest.get('created')} / {manifest.get('status')}"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<h2>How this run was made</h2><table class='kv'>{body}</table>"


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash; the others are still examples
        if isinstance(rec, dict) and "instruction" in rec and "response" in rec:
            out.append(rec)
    return out


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " …"


def examples_section(run: RunDir) -> str:
    """Baseline vs each intervention on the same prompts, per dataset, folded behind a content warning."""
    by_dataset: dict[str, dict[str, dict[str, dict]]] = {}
    for path in sorted((run / "completions").glob("*__*.jsonl")):
        dataset = path.stem.split("__", 1)[0]
        for rec in _read_jsonl(path):
            label = str(rec.get("intervention") or path.stem.split("__", 1)[1])
            by_dataset.setdefault(dataset, {}).setdefault(label, {}).setdefault(rec["instruction"], rec)
    if not by_dataset:
        return ""
    blocks = []
    for dataset, by_label in by_dataset.items():
        labels = sorted(by_label, key=lambda x: (x != "none", x))
        prompts = list(by_label[labels[0]])[:EXAMPLES_PER_DATASET]
        head = "<th>prompt</th>" + "".join(f"<th>{html.escape(x)}</th>" for x in labels)
        rows = ""
        for prompt in prompts:
            cells = ""
            for label in labels:
                rec = by_label[label].get(prompt)
                if rec is None:
                    cells += "<td class='ex'>–</td>"
                    continue
                verdict = " <b>[refusal]</b>" if rec.get("refusal") else ""
                cells += f"<td class='ex'>{html.escape(_clip(rec['response']))}{verdict}</td>"
            rows += f"<tr><td class='ex'>{html.escape(_clip(prompt))}</td>{cells}</tr>"
        blocks.append(f"<h3>{html.escape(dataset)}</h3><table class='examples'><tr>{head}</tr>{rows}</table>")
    return ("<h2>Example completions</h2><details><summary>Content warning: harmful requests and possibly harmful "
            f"model output. Show the first {EXAMPLES_PER_DATASET} prompts per dataset, baseline (none) next to each "
            f"intervention, responses cut at {EXAMPLE_CHARS} characters.</summary>" + "".join(blocks) + "</details>")


def _compare_rows(run: RunDir) -> list[dict]:
    path = run / "compare.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data.get("rows", data.get("methods", [])) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def comparison_section(run: RunDir, metrics: list[dict[str, Any]]) -> str:
    """Every method on one table: compare.json when present, else the held-out rows pivoted by intervention."""
    rows = _compare_rows(run)
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return "<h2>Methods compared (compare.json)</h2>" + table(rows, columns)
    rated = [r for r in metrics if "refusal_rate" in r and r.get("dataset") and r.get("intervention")]
    methods = list(dict.fromkeys(r["intervention"] for r in rated))
    if len([m for m in methods if m != "none"]) < 2:
        return ""
    def column(r: dict) -> str:  # one column per dataset, judge and length: different measurements never merge
        return f"{r['dataset']} ({r.get('judge') or 'substring'}, {r.get('max_new_tokens', '?')} tokens)"

    columns_seen = list(dict.fromkeys(column(r) for r in rated))
    pivot = []
    for method in methods:
        row: dict[str, Any] = {"intervention": method}
        for r in rated:
            if r["intervention"] == method:
                ci = r.get("ci95") or [float("nan")] * 2
                cell = f"{r['refusal_rate']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] n={r.get('n')}"
                if r.get("deflection_rate") is not None:
                    dci = r.get("deflection_ci95") or [float("nan")] * 2
                    cell += f"; deflection {r['deflection_rate']:.2f} [{dci[0]:.2f}, {dci[1]:.2f}]"
                row[column(r)] = cell
                if r.get("kl") is not None:
                    row["KL (harmless)"] = r["kl"]
        pivot.append(row)
    columns = ["intervention", *columns_seen] + (["KL (harmless)"] if any("KL (harmless)" in r for r in pivot) else [])
    return ("<h2>Methods compared (held-out refusal rate [95% CI])</h2>" + table(pivot, columns))
