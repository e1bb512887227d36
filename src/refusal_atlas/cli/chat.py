"""`refusal-atlas chat`: talk to the original and the edited model of a run, one answer after the other.

Each line you type goes to both models; their answers stream token by token, labelled. Commands:
``/system TEXT`` (a new system prompt for both; history kept), ``/reset`` (forget the history),
``/quit``. On a terminal it prompts with ``you>``; through a pipe it reads plain lines and writes
labelled answers, so scripts and tests can drive it. The run and its models: workflows/chat.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, TextIO

import typer

HELP = "commands: /system TEXT, /reset, /quit; anything else is sent to both models"


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
    from refusal_atlas.workflows.chat import chat_sides

    sides = chat_sides(run_dir, directions, edit, max_new_tokens, only_edited)
    chat_loop(sides, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_cmd)
