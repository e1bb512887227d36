"""One table over every direction set and edit evaluated in one or more run directories.

Rows are keyed by the artifact that produced them (intervention label + content fingerprint), so
two direction files that share a method name never merge into one row, and a row is never
credited to a direction that did not make it. Cells come straight from metrics.json records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from refusal_atlas.core.errors import ArtifactError
from refusal_atlas.core.rundir import RunDir

FIRST_TOKEN_KL = "kl_first_token"


def _row_key(run: str, rec: dict) -> tuple:
    return run, rec.get("intervention"), rec.get("fingerprint")


def _rate(rec: dict) -> dict[str, Any]:
    return {"rate": rec.get("rate", rec.get("refusal_rate")), "ci95": rec.get("ci95"), "n": rec.get("n"),
            "judge": rec.get("judge"), "max_new_tokens": rec.get("max_new_tokens")}


def collect(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Rows (one per run × artifact) with refusal per harmful set, KL, induced and over-refusal."""
    rows: dict[tuple, dict[str, Any]] = {}
    for run_dir in run_dirs:
        run = RunDir(run_dir)
        records = run.metrics()
        if not records:
            raise ArtifactError(f"{run.path} has no metrics.json records; run `refusal-atlas evaluate` first")
        for rec in records:
            if rec.get("intervention") is None:
                continue
            key = _row_key(str(run.path), rec)
            kind = rec.get("kind")
            row = rows.setdefault(key, {
                "run": str(run.path), "intervention": rec.get("intervention"), "fingerprint": rec.get("fingerprint"),
                "kind": kind, "method": rec.get("method"), "layer": rec.get("layer"),
                "k": rec.get("k", 0 if kind in (None, "none") else 1),
                "refusal": {}, "kl": None, "over_refusal": None, "induced_refusal": None})
            metric, role = rec.get("metric"), rec.get("role")
            if metric == "refusal_rate" and role == "harmful":
                row["refusal"][rec["dataset"]] = _rate(rec)
            elif metric == "over_refusal_rate":
                row["over_refusal"] = _rate(rec)
            elif metric == "induced_refusal_rate":
                row["induced_refusal"] = _rate(rec)
            if rec.get("kl") is not None and (metric == FIRST_TOKEN_KL or row["kl"] is None):
                # evaluate's first-token KL record wins over the next-token KL that `run` stores with its rates
                row["kl"] = {"value": rec["kl"], "ci95": rec.get("ci95") if metric == FIRST_TOKEN_KL else None,
                             "n": rec.get("n"), "dataset": rec.get("dataset")}
    return list(rows.values())


def _fmt_rate(cell: dict | None) -> str:
    if not cell or cell.get("rate") is None:
        return "-"
    ci = cell.get("ci95") or [float("nan")] * 2
    return f"{cell['rate']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (n {cell['n']})"


def to_markdown(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    datasets = sorted({d for r in rows for d in r["refusal"]})
    head = ["run", "artifact", "fingerprint", "method", "k", *[f"refusal: {d}" for d in datasets],
            "KL (first token)", "over-refusal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']['value']:.3f}"
        cells = [Path(r["run"]).name, r["intervention"], r["fingerprint"] or "-", r["method"] or "-", str(r["k"]),
                 *[_fmt_rate(r["refusal"].get(d)) for d in datasets], kl, _fmt_rate(r["over_refusal"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps({"rows": list(rows)}, indent=2) + "\n"
