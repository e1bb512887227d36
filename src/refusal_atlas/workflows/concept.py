"""Any concept, not only refusal: the same extract → DIM → select → edit → evaluate flow on your prompts.

A concept is given by two prompt files (``positive``: prompts where the model shows it, e.g. questions
asked in French; ``negative``: where it does not, e.g. the same questions in English) and a marker
list: a completion shows the concept when it contains any marker (case-insensitive substring). The
"refusal score" of the selection step becomes the log-odds of the markers' start words as the next
token (capitalised markers that are single tokens, or ``start_words``).

Each file is shuffled with the seed and split: the last ``n_test`` prompts are held out for the
reported numbers, the ``n_val`` before them select the layer, the rest build the directions.
Reported: the marker rate on held-out positive prompts without and with the direction ablated, on
held-out negative prompts without and with it added (ActAdd), and next-token KL on negative prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refusal_atlas.core.errors import ConfigError, DataError


@dataclass
class ConceptSpec:
    name: str
    positive: str
    negative: str
    markers: list[str]
    start_words: list[str] = field(default_factory=list)
    n_val: int = 8
    n_test: int = 12
    layers: list[int] | None = None
    kl_threshold: float = 0.1
    max_new_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.markers = [m for m in self.markers if m.strip()]  # spaces are part of a marker (" est ")
        if not self.markers:
            raise ConfigError("a concept needs at least one marker (a substring its completions contain)")
        if self.n_val < 1 or self.n_test < 1 or self.max_new_tokens < 1:
            raise ConfigError("n_val, n_test and max_new_tokens must be >= 1")


def read_markers(path: str | Path) -> list[str]:
    """One marker per line, spaces kept (" est " does not match "best"); blank and # lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read marker file {path}: {exc.strerror}") from None
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def split_prompts(name: str, n_val: int, n_test: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) instructions of one prompt file, shuffled with ``seed``."""
    from refusal_atlas.data import load_prompts

    texts = [p.instruction for p in load_prompts(name)]
    random.Random(seed).shuffle(texts)
    if len(texts) < n_val + n_test + 2:
        raise DataError(f"{name} has {len(texts)} prompts; need at least n_val + n_test + 2 = {n_val + n_test + 2}")
    return texts[: len(texts) - n_val - n_test], texts[-n_val - n_test: -n_test], texts[-n_test:]


def shows_concept(text: str, markers: list[str]) -> bool:
    low = text.lower()
    return any(m.lower() in low for m in markers)


def start_token_ids(tokenizer, words: list[str]) -> list[int]:
    from refusal_atlas.evaluation.refusal import refusal_token_ids

    try:
        return refusal_token_ids(tokenizer, words)
    except Exception:  # noqa: BLE001 - ModelError: none is a single token
        raise ConfigError(f"none of the start words {words[:8]} is a single token; pass --start-words") from None


def _rate(atlas, prompts: list[str], spec: ConceptSpec, label: str, dataset: str, edit) -> tuple[dict, list[dict]]:
    from refusal_atlas.evaluation.stats import rate_record

    with atlas.edit(edit):
        answers = atlas.generate(prompts, max_new_tokens=spec.max_new_tokens)
    hits = [shows_concept(a, spec.markers) for a in answers]
    record = {"dataset": dataset, "intervention": label, "judge": f"markers:{spec.name}", "metric": "concept_rate",
              **rate_record(sum(hits), len(hits))}
    record["refusal_rate"] = record.get("rate", sum(hits) / len(hits))  # the report's rate column
    rows = [{"instruction": p, "response": a, "refusal": h, "intervention": label}
            for p, a, h in zip(prompts, answers, hits)]
    return record, rows


def run_concept(atlas, spec: ConceptSpec, run_dir: str | Path, *, force: bool = False) -> list[dict]:
    """Build, select and evaluate the concept direction; write a run directory the report can draw."""
    from refusal_atlas.api import Activations
    from refusal_atlas.directions.dim import difference_in_means
    from refusal_atlas.directions.select import select_direction
    from refusal_atlas.edits import ActAdd, DirectionalAblation, NoEdit
    from refusal_atlas.core.io import atomic_dir, save_tensors, write_json, write_text
    from refusal_atlas.core.rundir import RunDir

    pos = split_prompts(spec.positive, spec.n_val, spec.n_test, spec.seed)
    neg = split_prompts(spec.negative, spec.n_val, spec.n_test, spec.seed)
    words = spec.start_words or list(dict.fromkeys(m.strip().split()[0].capitalize() for m in spec.markers))
    ids = start_token_ids(atlas.tokenizer, words)
    acts: Activations = atlas.extract(pos[0], neg[0], positions=[-1])
    cands = difference_in_means(acts.harmful, acts.harmless)
    layers = spec.layers or list(range(atlas.n_layers // 3, int(atlas.n_layers * 0.8)))
    sel = select_direction(atlas.adapter, atlas.chat, cands, pos[1], neg[1], ids, kl_threshold=spec.kl_threshold,
                           layers=layers, positions=[-1], batch_size=atlas.batch_size)
    direction = sel.direction
    assert direction is not None  # not strict: filters relax rather than fail
    direction.meta.update(concept=spec.name)
    ablate = DirectionalAblation.from_directions(direction, label=f"ablate:{spec.name}")
    add = ActAdd.from_directions(direction, 1.0, label=f"actadd:{spec.name}@{direction.layer}")
    records, completions = [], {}
    for dataset, prompts, edits in ((f"{spec.name}_positive_test", pos[2], (NoEdit(), ablate)),
                                    (f"{spec.name}_negative_test", neg[2], (NoEdit(), add, ablate))):
        for edit in edits:
            rec, rows = _rate(atlas, prompts, spec, edit.label, dataset, edit)
            records.append(rec)
            completions[(dataset, edit.label)] = rows
    from refusal_atlas.data import Prompt
    from refusal_atlas.evaluation.evaluate import evaluate_kl

    for rec in records:
        if rec["dataset"].endswith("negative_test") and rec["intervention"] != "none":
            edit = ablate if rec["intervention"] == ablate.label else add
            rec["kl"], _ = evaluate_kl(atlas.adapter, atlas.chat, [Prompt(p) for p in neg[2]], edit,
                                       batch_size=atlas.batch_size)
    manifest_config = {**asdict(spec), "model": atlas.name, "n_train": len(pos[0]), "positions": [-1],
                       "layers": layers, "filter_train": False, "n_val": spec.n_val, "n_eval": spec.n_test}
    with atomic_dir(run_dir, force=force) as tmp:
        run = RunDir(tmp)
        run.init_manifest(manifest_config, {"name": atlas.name, "n_layers": atlas.n_layers, "d_model": atlas.d_model,
                                            "concept_start_token_ids": ids})
        run.update_manifest(status="complete", concept={"name": spec.name, "markers": spec.markers,
                                                        "start_words": words},
                            train_counts={"harmful": {"sampled": len(pos[0]), "kept": len(pos[0])},
                                          "harmless": {"sampled": len(neg[0]), "kept": len(neg[0])}})
        save_tensors(run.direction_path("dim_candidates"), {"vectors": cands.vectors},
                     {"layers": cands.layers, "positions": cands.positions})
        direction.save(run.direction_path("dim"))
        write_json(run / "selection.json", {"chosen": {"layer": direction.layer, "position": direction.position},
                                            "relaxed_filters": sel.relaxed, "baseline": sel.baseline,
                                            "candidates": sel.scores})
        for (dataset, label), rows in completions.items():
            write_text(run.completions_path(dataset, label), "".join(json.dumps(r) + "\n" for r in rows))
        run.add_metrics(records)
    return records


def concept(run_dir: Path, spec: ConceptSpec, *, model: str = "embedded", device: str | None = None,
            batch_size: int = 16, force: bool = False) -> tuple[list[dict], Path]:
    """The `concept` verb: check the prompt files and the run directory, load ``model``, map the concept,
    write the report → (records, report path)."""
    for source in (spec.positive, spec.negative):  # bad prompt files fail here, before the model loads
        split_prompts(source, spec.n_val, spec.n_test, spec.seed)
    from refusal_atlas.core.io import check_output_dir  # imports torch: after the cheap checks

    check_output_dir(run_dir, force)
    from refusal_atlas.api import Atlas
    from refusal_atlas.report.html import build_report

    atlas = Atlas.load(model, device=device, batch_size=batch_size)
    records = run_concept(atlas, spec, run_dir, force=force)
    return records, build_report(run_dir)


def concept_summary(records: list[dict[str, Any]]) -> str:
    lines = [f"{'dataset':<28} {'intervention':<26} {'n':>4} {'rate':>6}  {'95% CI':<14} {'KL':>6}"]
    for r in records:
        kl = f"{r['kl']:.3f}" if r.get("kl") is not None else "-"
        ci = r.get("ci95", [float("nan")] * 2)
        lines.append(f"{r['dataset']:<28} {r['intervention']:<26} {r['n']:>4} {r['refusal_rate']:>6.2f}  "
                     f"[{ci[0]:.2f}, {ci[1]:.2f}]   {kl:>6}")
    return "\n".join(lines)
