"""`refusal-atlas chat`: talk to the original and the edited model of a run, one answer after the other.

Each line you type goes to both models; their answers stream token by token, labelled. Commands:
``/system TEXT`` (a new system prompt for both; history kept), ``/reset`` (forget the history),
``/quit``. On a terminal it prompts with ``you>``; through a pipe it reads plain lines and writes
labelled answers, so scripts and tests can drive it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional, TextIO

import typer

from refusal_atlas.core.errors import ArtifactError, ConfigError

HELP = "commands: /system TEXT, /reset, /quit; anything else is sent to both models"


def _check_run(run_dir: Path, directions: str) -> Path:
    """Fail before the model loads: a run directory with the direction file."""
    if not (run_dir / "manifest.json").is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no manifest.json); run `refusal-atlas run` first")
    path = run_dir / "directions" / f"{directions}.safetensors"
    if not path.is_file():
        found = sorted(p.stem for p in (run_dir / "directions").glob("*.safetensors"))
        raise ArtifactError(f"no direction file {directions!r} in {run_dir} (available: {', '.join(found) or 'none'})")
    return path


def chat_loop(sides: list[tuple[str, object]], lines: TextIO, out: TextIO, interactive: bool) -> None:
    """Send each input line to every (label, Conversation); handle the slash commands."""
    if interactive:
        out.write(HELP + "\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            for _, conv in sides:
                conv.reset()
            out.write("(history cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            for _, conv in sides:
                conv.system = system
            out.write(f"(system prompt: {system!r})\n")
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}; {HELP})\n")
            continue
        for label, conv in sides:
            out.write(f"[{label}] ")
            out.flush()
            for piece in conv.reply(text):
                out.write(piece)
                out.flush()
            out.write("\n")
        out.flush()


def chat_cmd(
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", help="run directory")],
    directions: Annotated[str, typer.Option(help="direction file name in the run directory")] = "dim",
    edit: Annotated[str, typer.Option(help="ablate, actadd or actadd:<coeff> (as evaluate --interventions)")] = "ablate",
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per answer")] = 128,
    only_edited: Annotated[bool, typer.Option(help="answer with the edited model only")] = False,
) -> None:
    """Chat with the original and the edited (e.g. direction-ablated) model side by side, streamed."""
    path = _check_run(run_dir, directions)  # before any heavy import: a mistyped -r answers in milliseconds
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.evaluation.evaluate import check_interventions, parse_interventions

    check_interventions([edit])
    if edit == "none":
        raise ConfigError("--edit none would chat with the original model twice; use ablate or actadd")
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    from refusal_atlas.model.conversation import Conversation
    from refusal_atlas.workflows.run import config_from_run
    from refusal_atlas.workflows.workspace import open_workspace

    ws = open_workspace(config_from_run(run_dir), run_dir, must_exist=True)
    spec = parse_interventions([edit], DirectionSet.load(path), mode=ws.cfg.ablation_mode)[0]
    tok = ws.chat.tokenizer

    def side(intervention):
        return Conversation(ws.adapter, tok, intervention, ws.cfg.system_prompt, max_new_tokens)

    sides = [] if only_edited else [("original", side(None))]
    sides.append((f"edited {spec.label}", side(spec)))
    chat_loop(sides, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_cmd)
