"""The `refusal-atlas` command line; one module per verb group, registered by cli/app.py."""

from refusal_atlas.cli.app import app, main

__all__ = ["app", "main"]
