"""`refusal-atlas judge`: judge a file of responses; `judge train` / `judge accuracy` for the meaning judge.

``judge FILE.jsonl`` is short for ``judge score FILE.jsonl``: the group reads a first argument that is not
one of its sub-commands as the file to score (name a file called ``train`` or ``accuracy`` as ``./train``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas.cli.common import default_subcommand, parse_names

SUBCOMMANDS = ("score", "train", "accuracy")


judge_app = typer.Typer(cls=default_subcommand("score"), no_args_is_help=True, rich_markup_mode=None,
                        help="Judge any JSONL file of responses (`judge FILE --judge substring,markers,meaning`); "
                             "train the meaning judge (`judge train`); measure judges on labels (`judge accuracy`).")

JudgeModelOpt = Annotated[Optional[str], typer.Option(help="hf judge: HF id, directory or 'embedded'")]
ThresholdOpt = Annotated[Optional[float], typer.Option(
    help="hf judge: complied when the complied answer's share of the answer mass is >= this (default: most likely "
         "answer); choose it on other items than those you score")]
EndpointUrlOpt = Annotated[Optional[str], typer.Option(help="endpoint judge: http://host:port/v1")]
EndpointModelOpt = Annotated[Optional[str], typer.Option(help="endpoint judge: served model name")]
RubricOpt = Annotated[str, typer.Option(help="endpoint judge rubric: strongreject or harmbench")]
HeadOpt = Annotated[Optional[Path], typer.Option(help="meaning judge: a trained head (.safetensors with its .json) "
                                                      "instead of the shipped one")]
ForceOpt = Annotated[bool, typer.Option(help="replace an existing output")]


def _options(judge_model, judge_threshold, endpoint_url, endpoint_model, rubric, meaning_head):
    from refusal_atlas.evaluation.judges import JudgeOptions

    return JudgeOptions(judge_model=judge_model, judge_threshold=judge_threshold, endpoint_url=endpoint_url,
                        endpoint_model=endpoint_model, endpoint_rubric=rubric, meaning_head=meaning_head)


@judge_app.command("score")
def score(
    file: Annotated[Path, typer.Argument(help="JSONL: one object per line with `response` and `instruction` (or "
                                              "`prompt`); other fields are kept")],
    judge: Annotated[str, typer.Option(help="comma-separated: substring, markers, meaning, hf, endpoint")] = "substring",
    out: Annotated[Optional[Path], typer.Option(help="write every row again with a `verdicts` object")] = None,
    force: ForceOpt = False,
    role: Annotated[str, typer.Option(help="role of rows without one: harmful, harmless or over_refusal")] = "harmful",
    judge_model: JudgeModelOpt = None,
    judge_threshold: ThresholdOpt = None,
    endpoint_url: EndpointUrlOpt = None,
    endpoint_model: EndpointModelOpt = None,
    rubric: RubricOpt = "strongreject",
    meaning_head: HeadOpt = None,
) -> None:
    """Each judge's refusal rate (Wilson 95%) on a file of responses; four-label judges give every label's rate."""
    from refusal_atlas.workflows.judge import format_rates, score_file

    opts = _options(judge_model, judge_threshold, endpoint_url, endpoint_model, rubric, meaning_head)
    records = score_file(file, parse_names(judge) or [], opts, out=out, force=force, role=role)
    typer.echo(format_rates(records))
    if out is not None:
        typer.echo(f"wrote {out}")


@judge_app.command("train")
def train(
    labelled: Annotated[Path, typer.Argument(help="labelled JSONL (label: refusal, deflection, compliance, broken)")],
    out: Annotated[Optional[Path], typer.Option(help="head .safetensors (default: the shipped meaning_head)")] = None,
    force: ForceOpt = False,
    folds: Annotated[int, typer.Option(help="cross-validation folds inside the training part")] = 5,
    l2: Annotated[Optional[str], typer.Option(help="comma-separated L2 strengths to choose from")] = None,
) -> None:
    """Train the meaning judge's head on the training part of a labelled set (split by prompt_id)."""
    from refusal_atlas.core.errors import RefusalAtlasError
    from refusal_atlas.evaluation.judges.meaning import DEFAULT_HEAD
    from refusal_atlas.workflows.judge import DEFAULT_L2, train_meaning

    try:
        grid = [float(x) for x in parse_names(l2)] if l2 is not None else list(DEFAULT_L2)
    except ValueError:
        raise RefusalAtlasError(f"--l2 wants comma-separated numbers, got {l2!r}") from None
    info = train_meaning(labelled, out or DEFAULT_HEAD, force=force, folds=folds, l2_grid=grid)
    hp = info["hyper_parameters"]
    typer.echo(f"trained on {info['training_set']['train_rows']} rows "
               f"({', '.join(f'{k} {v}' for k, v in info['training_set']['train_rows_per_label'].items())}); "
               f"L2 {hp['l2']:g} by {hp['folds']}-fold cross-validation")
    for rec in info["cross_validation"]:
        typer.echo(f"  l2 {rec['l2']:<8g} log-loss {rec['log_loss']:.4f}  accuracy {rec['accuracy']:.3f}")
    if hp["chosen_at_grid_edge"] and len(hp["l2_grid"]) > 1:
        typer.echo("note: the chosen L2 is at the edge of the grid; widen --l2 and train again")
    typer.echo(f"wrote {out or DEFAULT_HEAD} and its .json")


@judge_app.command("accuracy")
def accuracy(
    labelled: Annotated[Path, typer.Argument(help="labelled JSONL (label: refusal, deflection, compliance, broken)")],
    judge: Annotated[str, typer.Option(help="comma-separated: substring, markers, meaning, logit, hf, endpoint")]
    = "substring,markers,meaning",
    part: Annotated[str, typer.Option(help="heldout (default; the rows the meaning judge never saw) or all")] = "heldout",
    out: Annotated[Optional[Path], typer.Option(help="directory for judge_accuracy.json and judge_accuracy.md")] = None,
    force: ForceOpt = False,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="logit judge: the run that made the set")]
    = None,
    judge_model: JudgeModelOpt = None,
    judge_threshold: ThresholdOpt = None,
    endpoint_url: EndpointUrlOpt = None,
    endpoint_model: EndpointModelOpt = None,
    rubric: RubricOpt = "strongreject",
    meaning_head: HeadOpt = None,
) -> None:
    """Each judge's accuracy and per-class recall (Wilson 95%) against the labels, with confusion matrices."""
    from refusal_atlas.workflows.judge import measure_accuracy

    opts = _options(judge_model, judge_threshold, endpoint_url, endpoint_model, rubric, meaning_head)
    report = measure_accuracy(labelled, parse_names(judge) or [], opts, part=part, out_dir=out, force=force,
                              run_dir=run_dir)
    typer.echo(report["markdown"], nl=False)
    if out is not None:
        typer.echo(f"wrote {out / 'judge_accuracy.json'} and {out / 'judge_accuracy.md'}")


def register(app: typer.Typer) -> None:
    app.add_typer(judge_app, name="judge")
