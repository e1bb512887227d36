"""Command line: a thin skin over the Python API. Every verb works on a run directory.

Errors caused by input print one line (``error: ...``) and exit with status 2. This module makes
the app and registers every verb module (one per verb group, each with a ``register`` function) in
the order ``--help`` lists them; a new verb group is a new module here plus one line below.
"""

from __future__ import annotations

import sys

import typer

from refusal_atlas.cli import (chat, compare, concept, config, evaluate, export, gradient, judge, prepare, reproduce, run,
                              search, som, train_edit)
from refusal_atlas.core.errors import RefusalAtlasError

# rich_markup_mode=None: help texts are plain text, so "[k, k_max]" and brackets stay as written
# the app's help is cli/config.py's global_options docstring (it also explains the settings layers)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None)
directions_app = typer.Typer(help="Build refusal directions from a run directory's representations.",
                             no_args_is_help=True, rich_markup_mode=None)
app.add_typer(directions_app, name="directions")

run.register(app, directions_app)
evaluate.register(app)
judge.register(app)
prepare.register(app)
config.register(app)
chat.register(app)
concept.register(app)
som.register(directions_app)
search.register(app)
gradient.register(directions_app)
train_edit.register(app)
compare.register(app)
reproduce.register(app)
export.register(app)


_INTERRUPTED = "interrupted: finished steps are kept in the run directory (use --resume)"


def main() -> None:
    try:
        app()
    except RefusalAtlasError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(_INTERRUPTED, err=True)
        sys.exit(130)
    except PermissionError as exc:  # e.g. a run directory made read-only while a step ran
        typer.echo(f"error: permission denied: {exc.filename or exc}", err=True)
        sys.exit(2)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130
            typer.echo(_INTERRUPTED, err=True)
        raise

