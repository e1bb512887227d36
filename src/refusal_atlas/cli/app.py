"""Command line: a thin skin over the Python API. Every verb works on a run directory.

Errors caused by input print one line (``error: ...``) and exit with status 2; so does a disk that
fills up mid-write. SIGTERM becomes an exception (:class:`Terminated`), like Ctrl-C's KeyboardInterrupt, so
every ``finally`` runs: an export or any atomic write stopped half-way removes its temporary files, and the
command ends with one ``error:`` line (exit 143; Ctrl-C: 130). This module makes the app and registers every verb module (one per verb group, each with a ``register`` function) in
the order ``--help`` lists them; a new verb group is a new module here plus one line below.
"""

from __future__ import annotations

import signal
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


_STOPPED = ("finished steps are kept in the run directory (use --resume); nothing half-written was kept")
_INTERRUPTED = f"error: interrupted: {_STOPPED}"


class Terminated(BaseException):
    """SIGTERM, raised where the program is (not an Exception: no ``except Exception`` swallows it)."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one orderly stop: a second SIGTERM must not cut the clean-up
    raise Terminated


def main() -> None:
    from refusal_atlas.core.resources import is_disk_full

    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        app()
    except RefusalAtlasError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Terminated:
        typer.echo(f"error: terminated (SIGTERM): {_STOPPED}", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        typer.echo(_INTERRUPTED, err=True)
        sys.exit(130)
    except PermissionError as exc:  # e.g. a run directory made read-only while a step ran
        typer.echo(f"error: permission denied: {exc.filename or exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        typer.echo(f"error: no space left on the device ({exc.filename or exc}); free some space and rerun", err=True)
        sys.exit(2)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130
            typer.echo(_INTERRUPTED, err=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

