"""Where each setting comes from: the layers around RunConfig.

Highest wins: CLI flag > ``REFUSAL_ATLAS_<FIELD>`` environment variable > ``./refusal-atlas.toml``
> ``--config FILE`` > (for a verb on an existing run) the run's manifest > RunConfig defaults.
Every layer is validated by the one RunConfig model, and every value keeps the name of its layer so
``refusal-atlas config`` can show it. On an existing run, the settings that made its artifacts
(model, prompt sets, seed, ...) come from its manifest: a stray environment variable or TOML file never
changes them, only an explicit CLI flag does.

The environment is read with pydantic-settings (lists as JSON, e.g. ``REFUSAL_ATLAS_LAYERS='[8, 10]'``).
The CLI turns the file and environment layers on (``activate``); library calls stay pure unless asked.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functools import cache

from pydantic import ValidationError

from refusal_atlas.config import RunConfig
from refusal_atlas.core.errors import ConfigError

ENV_PREFIX = "REFUSAL_ATLAS_"
LOCAL_FILE = "refusal-atlas.toml"
# settings that made a run's artifacts: on an existing run only its manifest or a CLI flag sets them
RUN_IDENTITY = ("model", "dtype", "chat_template", "system_prompt", "harmful_train", "harmless_train", "n_train",
                "filter_train", "seed")


@cache
def run_settings_class() -> type:
    """RunConfig's fields, readable from ``REFUSAL_ATLAS_*`` environment variables (built on first use:
    pydantic-settings costs a noticeable import that verbs failing on bad input should not pay)."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class RunSettings(RunConfig, BaseSettings):
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    return RunSettings


@dataclass
class ResolvedConfig:
    config: RunConfig
    sources: dict[str, str]  # field -> the layer its value came from
    ignored: list[str] = field(default_factory=list)  # layer values that did not apply, and why

    def describe(self) -> str:
        """The effective config, one ``name = value  # source`` line per field."""
        width = max(len(k) for k in self.sources)
        lines = [f"{k:<{width}} = {_show(v):<28} # {self.sources[k]}" for k, v in self.config.model_dump().items()]
        return "\n".join(lines + [f"# ignored: {note}" for note in self.ignored])


def _show(value: Any) -> str:
    return "None" if value is None else repr(value) if isinstance(value, str) else str(value).replace("'", '"')


@dataclass
class _Layers:
    active: bool = False
    config_file: Path | None = None


_LAYERS = _Layers()


def activate(config_file: str | Path | None = None) -> None:
    """Turn on the environment and file layers for this process (the CLI does this once)."""
    _LAYERS.active, _LAYERS.config_file = True, Path(config_file) if config_file else None


def deactivate() -> None:
    _LAYERS.active, _LAYERS.config_file = False, None


def layers_active() -> bool:
    return _LAYERS.active


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from None
    unknown = sorted(set(data) - set(RunConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in {path} (see `refusal-atlas config` for the names)")
    return data


def read_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """RunConfig values set as ``REFUSAL_ATLAS_<FIELD>`` (parsed by pydantic-settings)."""
    from pydantic_settings import EnvSettingsSource
    from pydantic_settings.exceptions import SettingsError

    env = os.environ if environ is None else environ
    source = EnvSettingsSource(run_settings_class(), case_sensitive=False, env_prefix=ENV_PREFIX)
    source.env_vars = {k.lower(): v for k, v in env.items()}
    try:
        values = source()
    except SettingsError as exc:
        raise ConfigError(f"invalid {ENV_PREFIX}* environment variable: {exc}") from None
    return {k: v for k, v in values.items() if k in RunConfig.model_fields}


def resolve_config(cli: Mapping[str, Any] | None = None, config_file: str | Path | None = None, *,
                   base: Mapping[str, Any] | None = None, layered: bool | None = None,
                   environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> ResolvedConfig:
    """Merge the layers (see module docstring) into one validated RunConfig with each value's source.

    ``cli``: flag values, None meaning "not given". ``base``: an existing run's manifest config.
    ``layered``: read the environment and ``./refusal-atlas.toml`` (default: when the CLI activated them).
    """
    layered = _LAYERS.active if layered is None else layered
    if config_file is None and layered:
        config_file = _LAYERS.config_file
    defaults = RunConfig().model_dump()
    merged, sources, ignored = dict(defaults), {k: "default" for k in defaults}, []
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("run manifest", {k: v for k, v in base.items() if k in defaults}))
    if config_file is not None:
        layers.append((f"--config {config_file}", read_toml(Path(config_file), "config file")))
    if layered:
        local = Path(cwd or ".") / LOCAL_FILE
        if local.is_file():
            layers.append((f"./{LOCAL_FILE}", read_toml(local, "config file")))
        layers.append(("env", read_env(environ)))
    for name, values in layers:
        for key, value in values.items():
            if base and name != "run manifest" and key in RUN_IDENTITY and value != base.get(key, defaults[key]):
                ignored.append(f"{key} from {name} (the run's manifest value is kept; pass a CLI flag to change it)")
                continue
            merged[key] = value
            sources[key] = f"env {ENV_PREFIX}{key.upper()}" if name == "env" else name
    for key, value in (cli or {}).items():
        if value is not None:
            merged[key], sources[key] = value, "cli"
    try:
        return ResolvedConfig(RunConfig(**merged), sources, ignored)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        source = sources.get(str(first["loc"][0]), "") if first["loc"] else ""
        raise ConfigError(f"invalid setting {where}{f' (from {source})' if source else ''}: {first['msg']}") from None
