"""Settings on the command line: the global ``--config`` / ``--version`` options and the `config` verb.

``refusal-atlas [--config FILE] VERB ...`` turns on the layered settings of settings.py for every verb;
``refusal-atlas config`` prints the effective values and where each came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from refusal_atlas import settings

ConfigFileOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML file of settings (below ./refusal-atlas.toml, REFUSAL_ATLAS_* and flags)")]


def setting_help(name: str, text: str = "") -> str:
    """Help for a flag that overrides a setting (``n_train``, ``search.k``): says which setting and its
    default, so no flag hides it."""
    info = settings.field_info(name)
    default = info.get_default(call_default_factory=True)
    what = text or info.description or name.rpartition(".")[2].replace("_", " ")
    return f"{what} [setting {name}; default: {default!r}]"


def _print_version(value: bool) -> None:
    if value:
        from refusal_atlas import __version__

        typer.echo(f"refusal-atlas {__version__}")
        raise typer.Exit()


def global_options(
    ctx: typer.Context,
    config: ConfigFileOpt = None,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="print the version and exit")] = False,
) -> None:
    """Map, remove and induce refusal in chat language models (research software).

    Settings, highest first: CLI flag > REFUSAL_ATLAS_<SETTING> environment variable > ./refusal-atlas.toml >
    --config FILE > (on an existing run) its manifest > defaults. `refusal-atlas config` shows them.
    """
    settings.activate(config)
    ctx.call_on_close(settings.deactivate)


def config_cmd(
    config: ConfigFileOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option(
        "--run-dir", "-r", help="show the settings a verb on this run directory would use")] = None,
) -> None:
    """Print the effective settings, each with its source (cli, env, ./refusal-atlas.toml, --config, manifest)."""
    base = None
    if run_dir is not None:
        from refusal_atlas.core.errors import ArtifactError
        from refusal_atlas.core.io import read_json

        if not (run_dir / "manifest.json").is_file():
            raise ArtifactError(f"{run_dir} is not a run directory (no manifest.json)")
        base = read_json(run_dir / "manifest.json").get("config", {})
    resolved = settings.resolve_settings(None, config, base=base, layered=True)
    typer.echo(resolved.describe())


def register(app: typer.Typer) -> None:
    app.callback()(global_options)
    app.command("config")(config_cmd)
