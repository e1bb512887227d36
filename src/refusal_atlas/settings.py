"""The settings: one model in nested sections, and the layers each value may come from.

Sections: ``model`` (which model, where and how it runs), ``data`` (train and validation prompt sets,
the seed), ``selection`` (the DIM candidates and the filters that choose one), ``evaluation`` (held-out
sets and generation), ``search`` (the edit and subset searches), ``training`` (the gradient methods),
``ara`` (the trained low-rank edit) and ``runtime`` (this process: model cache, progress bars, vLLM and
PostgreSQL knobs). The first four made a run's artifacts, so a run's manifest records them (``config``,
one table per section); search, training and ara settings belong to one verb call and runtime knobs to
one machine, so none of them is recorded.
Data roles follow the held-out rule: train splits build directions, validation splits choose among them
(and drive searches), test splits and benchmarks give the numbers we report.

Highest wins: CLI flag > ``REFUSAL_ATLAS_*`` environment variable > ``./refusal-atlas.toml`` >
``--config FILE`` > (for a verb on an existing run) the run's manifest > defaults. Every value keeps the
name of its layer so ``refusal-atlas config`` can show it. On an existing run, the settings that made
its artifacts (model, prompt sets, seed, ...) come from its manifest: a stray environment variable or
TOML file never changes them, only an explicit CLI flag does.

Names. A setting of the recorded sections or of ``runtime`` has a flat name, its field name (unique
across those sections): ``n_train = 64`` in TOML, ``REFUSAL_ATLAS_N_TRAIN=64``. Every setting also has its
nested name: ``[data] n_train = 64``, ``REFUSAL_ATLAS_DATA__N_TRAIN=64``; search and training settings
have only that one (``[search] score_tokens = 8``, ``REFUSAL_ATLAS_SEARCH__SCORE_TOKENS=8``). Manifests
written before the sections existed hold a flat ``config``; they load as they are.

The environment is read here and nowhere else in the package: pydantic-settings parses the
``REFUSAL_ATLAS_*`` variables (lists as JSON, e.g. ``REFUSAL_ATLAS_LAYERS='[8, 10]'``), :func:`test_hooks`
the crash-test hooks and :func:`endpoint_api_key` the endpoint judge's token. The CLI turns the file and
environment layers on (:func:`activate`); library calls stay pure unless asked.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from refusal_atlas.core import runtime as process
from refusal_atlas.core.errors import ConfigError

ENV_PREFIX = "REFUSAL_ATLAS_"
LOCAL_FILE = "refusal-atlas.toml"
KILL_AFTER_ENV, WORK_LOG_ENV = f"{ENV_PREFIX}TEST_KILL_AFTER", f"{ENV_PREFIX}TEST_WORK_LOG"  # crash-test hooks


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    """Which model, on which devices, in which dtype and chat format, and how many prompts per forward pass."""

    model: str = "embedded"
    device: str | None = None
    dtype: str | None = None
    # placement (accelerate): auto|balanced|balanced_low_0|sequential|<file.json>|{module: device}; "0=20GiB,cpu=64GiB"
    device_map: str | dict[str, int | str] | None = None
    max_memory: str | dict[str, str] | None = None
    dtype_fallback: bool = Field(True, description="reload in float32 when the dtype gives non-finite baseline logits")
    system_prompt: str | None = Field(None, description="None: the chat template's own default")
    chat_template: str | None = Field(None, description="path to a Jinja chat template, for models without one")
    # 32: on CPU a decoding step reads every weight once whatever the batch, so larger batches amortize
    # it (bench/batch_size.py, 2 cores: generation 0.85x the time of batch 16, identical greedy outputs)
    batch_size: int = Field(32, ge=1)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v not in (None, "auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ValueError("dtype must be float32, bfloat16 or float16 (or auto)")
        return v

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, v):
        from refusal_atlas.model.placement import parse_device_map

        parse_device_map(v)
        return v

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v):
        from refusal_atlas.model.placement import parse_max_memory

        parse_max_memory(v)
        return v


class DataSettings(_Section):
    """The train prompts (directions) and validation prompts (selection, searches), sampled with ``seed``."""

    seed: int = 0
    harmful_train: str = "harmful_train"
    harmless_train: str = "harmless_train"
    n_train: int = Field(128, ge=2)
    filter_train: bool = Field(True, description="keep harmful prompts the model refuses / harmless it answers")
    harmful_val: str = "harmful_val"
    harmless_val: str = "harmless_val"
    n_val: int = Field(32, ge=1)


class SelectionSettings(_Section):
    """Which DIM candidates are scored, the filters that choose one, and how a direction set is ablated."""

    layers: list[int] | None = Field(None, description="candidate layers; None: floor(L/3) .. 0.8·L")
    positions: list[int] | None = Field([-1], description="post-instruction positions; None: all")
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    prune_layer_frac: float = Field(0.2, ge=0.0, lt=1.0)
    strict_filters: bool = Field(False, description="fail instead of relaxing filters when no candidate passes")
    layer: int | None = Field(None, description="skip selection and use DIM at this layer")
    ablation_mode: Literal["subspace", "sequential"] = "subspace"

    @field_validator("positions")
    @classmethod
    def _negative_positions(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(p >= 0 for p in v)):
            raise ValueError("positions are negative offsets from the end of the prompt (-1 = last token)")
        return v


class EvaluationSettings(_Section):
    """The held-out sets and how their completions are generated."""

    eval_harmful: list[str] = ["jailbreakbench"]
    eval_harmless: str = "harmless_test"
    n_eval: int = Field(100, ge=1)
    # 64: the shortest length whose verdicts all matched 256 tokens on the project's own measurement
    # (docs/results/2026-11-22_generation_length.md: 32 flipped 2 of 50 baseline verdicts, 64 none), so every
    # reported rate is read at a length that no longer changes it
    max_new_tokens: int = Field(64, ge=1)
    # a row stops once a refusal phrase appears (its substring verdict cannot change); false: full length.
    # Only the substring judge is decided that early: any other judge reads whole answers.
    stop_when_decided: bool = True
    # the judge of every reported rate (`run`, `evaluate` without --judge, the search's verification). One of
    # the judges that need no model or server of their own; `meaning` also tells deflection from compliance.
    judge: Literal["substring", "markers", "meaning"] = Field("substring", description="judge of reported rates")
    backend: Literal["hf", "vllm"] = Field("hf", description="generation engine of the held-out evaluation")
    # held-out generation only: a decoding step costs about the same for 32 rows as for 100, so one batch of
    # an evaluation set is cheapest (bench/batch_size.py, 2 cores, 100 prompts × 64 tokens: batch 100 took
    # 0.65x the time of batch 32, identical completions); forward passes stay at batch_size (larger is slower)
    generation_batch_size: int = Field(128, ge=1)


class SearchSettings(_Section):
    """The two searches on validation prompts: `search edits` (the default) and `search subsets` (SOM paper).

    The pick rule's KL bound is ``selection.kl_threshold`` and the subset search ablates in
    ``selection.ablation_mode``; the fields marked edits/subsets are read by that search only.
    """

    seed: int | None = Field(None, description="TPE sampler seed (None: the run's seed)")
    n_startup_trials: int = Field(10, description="random trials before TPE")
    k_max: int | None = Field(None, description="most directions per subset (edits: of each added set, 1..7)")
    sets: tuple[str, ...] = Field((), description="edits: DirectionSets to add as sources, e.g. som")
    transforms: tuple[str, ...] = Field(("project",), description="edits: write transforms to search among "
                                        "(project, householder, biproject); one: not searched")
    router: bool = Field(False, description="edits: also search a router-suppression strength (mixture-of-experts "
                                            "models only)")
    prune: bool = Field(True, description="edits: stop clearly dominated trials after 25% of the prompts")
    score_tokens: int = Field(0, description="edits: refusal = substring rate of N greedy tokens (0: logit)")
    refusal_stat: str = Field("probability", description="edits: refusal number = mean first-token refusal "
                                                         "probability (probability) or mean refusal log-odds (logodds)")
    max_kl: float | None = Field(None, description="edits: a KL cap; edits above it stay off the front and TPE "
                                                   "learns to avoid them (pruned early when clearly above)")
    # trials 0, 1, ...: ablation of the selected DIM direction at these strengths (1 = full ablation, the
    # run's own edit). Weaker ones lay a first front from end to end: on the embedded model KL grows about
    # as strength² and refusals fall about linearly (bench/vs_heretic.py, 2026-12-02, heretic's evaluator:
    # 1 → 14/100 at KL 0.076, 0.5 → 20 at 0.016, 0.25 → 31 at 0.0037, 0.12 → 38 at 0.0008), and TPE
    # alone finds few low-damage points early on.
    anchors: tuple[float, ...] = Field((1.0, 0.85, 0.7, 0.5, 0.25, 0.12),
                                       description="edits: warm-start strengths of DIM ablation")
    # the multi-fidelity step (search/verify.py): the proxy ranks, generation decides. 6 edits (+ DIM) × 32
    # validation prompts × 64 tokens; its cost on 2 CPU cores is printed by every search (not yet measured in
    # docs/results/, see docs/search.md)
    verify: int = Field(6, ge=0, description="edits: re-score the best N proxy-front edits (and full DIM ablation) by "
                                             "greedy generation on the harmful validation prompts (0: off)")
    verify_tokens: int = Field(64, ge=1, description="edits: new tokens per verification completion")
    judge: Literal["substring", "markers", "meaning"] | None = Field(
        None, description="edits: judge of the verification (None: the run's evaluation.judge)")
    # capability as a third objective (evaluation/capability.py); refusal and KL are always the first two
    objectives: tuple[str, ...] = Field(("refusal", "kl"), description="edits: objectives, refusal,kl or "
                                        "refusal,kl,TASK (TASK: basics, the offline task, or an lm-eval task)")
    task_n: int = Field(64, ge=1, description="edits: task items scored per trial (basics: a seeded sample of its "
                                              "validation part; lm-eval: the first N documents)")
    # a bound stated before any measurement: +0.05 nats of mean NLL = the correct choice's probability down by
    # about 5% (e^-0.05) on average; not tuned on any prompt or task item
    task_max_loss: float = Field(0.05, description="edits, with a task objective: the pick rule's bound on the "
                                                   "task loss (increase of mean NLL of the correct choice, nats)")
    directions: str = Field("som", description="subsets: direction file name under directions/")
    k: int = Field(3, description="subsets: directions per subset; with k_max, k is searched in [k, k_max]")
    compare: bool = Field(True, description="subsets: held-out comparison vs DIM after the search")


class TrainingSettings(_Section):
    """The gradient methods (`directions rdo|cone|repind`): their prompts, optimizer and loss weights."""

    n_train: int = Field(64, description="train prompts sampled per side (then filtered like the run)")
    n_val: int = Field(16, description="validation prompts per side (model selection)")
    target_tokens: int = Field(30, description="greedy tokens per target")
    steps: int = Field(40, description="max optimizer steps")
    batch_size: int = Field(8, description="examples per optimizer step")
    micro_batch: int | None = Field(None, description="examples per forward pass (None: 4; cones 2)")
    lr: float = Field(1e-2, description="AdamW learning rate")
    eval_every: int = Field(4, description="validate every N steps")
    patience: int = Field(3, description="validations without improvement before the lr is cut")
    ablation_weight: float = Field(1.0, description="ablation CE weight")
    addition_weight: float = Field(0.2, description="addition CE weight")
    retain_weight: float = Field(1.0, description="retain KL weight")
    val_kl_weight: float = Field(10.0, description="KL weight in the validation objective")
    seed: int | None = Field(None, description="None: the run's seed")


class AraSettings(_Section):
    """The ARA-style trained low-rank edit (`train-edit ara`): what it edits, its losses and optimizer.

    Defaults sized for the embedded 0.5B model on 2 CPU cores (docs/edits.md: trains in under 15 minutes);
    heretic's ARA uses rank ~50 on GPUs.
    """

    rank: int = Field(8, description="rank r of each update ΔW = B·A")
    layers: list[int] | None = Field(None, description="blocks whose o_proj and down_proj are edited; "
                                                       "None: floor(L/3) .. 0.8·L, the DIM selection band")
    components: tuple[str, ...] = Field(("attn", "mlp"), description="attn (o_proj) and/or mlp (down_proj)")
    target_layer: int | None = Field(None, description="layer whose last-position residual is moved "
                                                       "(None: the block after the last edited one)")
    n_train: int = Field(64, description="train prompts sampled per side (then filtered like the run)")
    n_val: int = Field(16, description="validation prompts per side (model selection)")
    retain_tokens: int = Field(16, description="greedy tokens of each harmless retain target")
    steps: int = Field(24, description="max optimizer steps")
    batch_size: int = Field(8, description="examples per optimizer step")
    micro_batch: int = Field(4, description="examples per forward pass")
    lr: float = Field(2e-3, description="AdamW learning rate")
    eval_every: int = Field(4, description="validate every N steps")
    patience: int = Field(3, description="validations without improvement before the lr is cut")
    shift_weight: float = Field(1.0, description="weight of the harmful-representation shift loss")
    retain_weight: float = Field(1.0, description="weight of the harmless retain KL")
    val_kl_weight: float = Field(10.0, description="KL weight in the validation objective")
    seed: int | None = Field(None, description="None: the run's seed")


_RUNTIME = process.Runtime()


class RuntimeSettings(_Section):
    """How this process runs on this machine; never recorded in a run."""

    cache: str | None = Field(None, description="folder for converted models (None: ~/.cache/refusal-atlas)")
    quiet: bool = Field(False, description="no progress bars")
    vllm_tp: int = Field(1, ge=1, description="--backend vllm: tensor-parallel GPUs")
    # the HF model used for KL and selection stays loaded beside vLLM
    vllm_gpu_memory: float = Field(0.5, gt=0, le=1, description="--backend vllm: fraction of GPU memory for vLLM")
    heartbeat_s: int = Field(_RUNTIME.heartbeat_s, ge=1, description="PostgreSQL search: seconds between a "
                                                                     "worker's heartbeats")
    grace_s: int = Field(_RUNTIME.grace_s, ge=1, description="PostgreSQL search: seconds of silence before a "
                                                             "trial is failed and retried")
    memory_limit: str | None = Field(None, description='memory a job may plan for, e.g. "20GiB" (None: what the '
                                                       'machine has free, MemAvailable; "off": no memory check)')

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str | None) -> str | None:
        if v is not None and str(v).strip().lower() != "off":
            from refusal_atlas.core.resources import parse_size

            parse_size(v, "memory_limit")
        return v


def memory_limit_bytes(value: str | None) -> int | None:
    """The ``memory_limit`` setting as core/runtime.py holds it: bytes, None (free memory) or 0 (no check)."""
    if value is None:
        return None
    if str(value).strip().lower() == "off":
        return 0
    from refusal_atlas.core.resources import parse_size

    return parse_size(value, "memory_limit")


class Settings(BaseModel):
    """Every setting, one section each (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    ara: AraSettings = Field(default_factory=AraSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)

    def run_config(self) -> dict[str, dict[str, Any]]:
        """What a run's manifest records (``config``): the sections that made its artifacts."""
        return {s: getattr(self, s).model_dump() for s in RUN_SECTIONS}

    def flat(self) -> dict[str, Any]:
        """The recorded settings by their flat names (the form the stage checks compare)."""
        return {name: value for table in self.run_config().values() for name, value in table.items()}


SECTIONS: dict[str, type[_Section]] = {name: info.annotation for name, info in Settings.model_fields.items()}
RUN_SECTIONS = ("model", "data", "selection", "evaluation")
FLAT_SECTIONS = (*RUN_SECTIONS, "runtime")  # their settings keep a flat name of their own
FLAT = {name: section for section in FLAT_SECTIONS for name in SECTIONS[section].model_fields}
assert len(FLAT) == sum(len(SECTIONS[s].model_fields) for s in FLAT_SECTIONS), "flat setting names must be unique"
# settings that made a run's artifacts: on an existing run only its manifest or a CLI flag sets them
RUN_IDENTITY = ("model", "dtype", "chat_template", "system_prompt", "harmful_train", "harmless_train", "n_train",
                "filter_train", "seed")

SettingPath = tuple[str, str]  # (section, field)


def key_of(path: SettingPath) -> str:
    """A setting's name as users write it: flat for the recorded and runtime sections, ``section.field`` else."""
    section, name = path
    return name if section in FLAT_SECTIONS else f"{section}.{name}"


def path_of(key: str) -> SettingPath:
    """``n_train`` or ``data.n_train`` → ("data", "n_train"); a ConfigError for an unknown name."""
    section, dot, name = key.partition(".")
    if dot and section in SECTIONS and name in SECTIONS[section].model_fields:
        return section, name
    if not dot and key in FLAT:
        return FLAT[key], key
    raise ConfigError(f"unknown setting {key!r}")


def field_info(key: str):
    section, name = path_of(key)
    return SECTIONS[section].model_fields[name]


# --- reading the layers ----------------------------------------------------------------------------------
def nest(values: Mapping[str, Any], where: str, strict: bool = True) -> dict[SettingPath, Any]:
    """A mapping of settings in any accepted form → {(section, field): value}.

    Accepted: flat names (``n_train``), dotted names (``data.n_train``) and section tables
    (``{"data": {"n_train": 64}}``). ``strict``: an unknown name is an error naming ``where`` (else skipped,
    as for an old manifest).
    """
    out: dict[SettingPath, Any] = {}

    def put(path: SettingPath, value: Any, written: str) -> None:
        if path in out:
            raise ConfigError(f"setting {key_of(path)} is given twice in {where} (once as {written})")
        out[path] = value

    for key, value in values.items():
        # a section table, except the flat `model` setting (a string) of manifests and files without sections
        if key in SECTIONS and isinstance(value, Mapping):
            for name, v in value.items():
                if name in SECTIONS[key].model_fields:
                    put((key, name), v, f"[{key}] {name}")
                elif strict:
                    raise ConfigError(f"unknown setting '{key}.{name}' in {where} (see `refusal-atlas config` for "
                                      "the names)")
            continue
        try:
            path = path_of(key)
        except ConfigError:
            if not strict:
                continue
            nested = [s for s, model in SECTIONS.items() if key in model.model_fields and s not in FLAT_SECTIONS]
            hint = f"; it lives in a section: {' or '.join(f'[{s}] {key}' for s in nested)}" if nested else ""
            raise ConfigError(f"unknown setting {key!r} in {where} (see `refusal-atlas config` for the names)"
                              f"{hint}") from None
        put(path, value, key)
    return out


def read_toml(path: Path, what: str = "config file") -> dict[SettingPath, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from None
    return nest(data, str(path))


@cache
def _env_classes() -> tuple[type, type]:
    """pydantic-settings readers of the flat and the nested variable names (built on first use:
    pydantic-settings costs a noticeable import that verbs failing on bad input should not pay)."""
    from pydantic import create_model
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Env(BaseSettings):
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    flat = create_model("FlatEnv", __base__=Env,
                        **{name: (SECTIONS[s].model_fields[name].annotation | None, None) for name, s in FLAT.items()})
    nested = create_model("NestedEnv", __base__=Env, **{s: (model | None, None) for s, model in SECTIONS.items()})
    return flat, nested


def read_env(environ: Mapping[str, str] | None = None) -> dict[SettingPath, tuple[Any, str]]:
    """Settings set as ``REFUSAL_ATLAS_<NAME>`` or ``REFUSAL_ATLAS_<SECTION>__<NAME>`` → (value, variable).

    Variables that name no setting (``REFUSAL_ATLAS_TEST_*``, typos of flat names) are ignored, as
    environment variables of other programs would be.
    """
    from pydantic_settings import EnvSettingsSource
    from pydantic_settings.exceptions import SettingsError

    env = {k.lower(): v for k, v in (os.environ if environ is None else environ).items()}
    prefix = ENV_PREFIX.lower()
    ours = {k: v for k, v in env.items() if k.startswith(prefix)}
    flat_cls, nested_cls = _env_classes()
    out: dict[SettingPath, tuple[Any, str]] = {}
    try:
        source = EnvSettingsSource(flat_cls, case_sensitive=False, env_prefix=ENV_PREFIX)
        source.env_vars = {k: v for k, v in ours.items() if "__" not in k[len(prefix):]}
        for name, value in source().items():
            if name in FLAT:
                out[(FLAT[name], name)] = (value, f"env {ENV_PREFIX}{name.upper()}")
        source = EnvSettingsSource(nested_cls, case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter="__")
        source.env_vars = {k: v for k, v in ours.items() if "__" in k[len(prefix):]}
        nested = source()
    except SettingsError as exc:
        raise ConfigError(f"invalid {ENV_PREFIX}* environment variable: {exc}") from None
    for section, table in nested.items():
        for name, value in (table or {}).items():
            if name not in SECTIONS[section].model_fields:
                raise ConfigError(f"unknown setting '{section}.{name}' in environment variable "
                                  f"{ENV_PREFIX}{section.upper()}__{name.upper()}")
            out[(section, name)] = (value, f"env {ENV_PREFIX}{section.upper()}__{name.upper()}")
    return out


@dataclass
class _Layers:
    active: bool = False
    config_file: Path | None = None
    saved_runtime: process.Runtime | None = None
    runtime_applied: bool = False  # by the notebook API (apply_runtime_once)


_LAYERS = _Layers()


def activate(config_file: str | Path | None = None) -> None:
    """Turn on the environment and file layers for this process and apply its runtime settings (the CLI
    does this once, before any verb)."""
    _LAYERS.active, _LAYERS.config_file = True, Path(config_file) if config_file else None
    _LAYERS.saved_runtime = apply_runtime()


def deactivate() -> None:
    if _LAYERS.saved_runtime is not None:
        process.restore(_LAYERS.saved_runtime)
    _LAYERS.active, _LAYERS.config_file, _LAYERS.saved_runtime = False, None, None


def layers_active() -> bool:
    return _LAYERS.active


def _layers(base: Mapping[str, Any] | None, config_file: str | Path | None, layered: bool,
            environ: Mapping[str, str] | None, cwd: str | Path | None) -> list[tuple[str, dict[SettingPath, tuple[Any, str]]]]:
    """(layer name, {path: (value, source)}), lowest first."""
    def labelled(values: dict[SettingPath, Any], label: str) -> dict[SettingPath, tuple[Any, str]]:
        return {p: (v, label) for p, v in values.items()}

    layers = []
    if base:
        recorded = {p: v for p, v in nest(base, "the run manifest", strict=False).items() if p[0] in RUN_SECTIONS}
        layers.append(("run manifest", labelled(recorded, "run manifest")))
    if config_file is not None:
        layers.append(("--config", labelled(read_toml(Path(config_file)), f"--config {config_file}")))
    if layered:
        local = Path(cwd or ".") / LOCAL_FILE
        if local.is_file():
            layers.append((LOCAL_FILE, labelled(read_toml(local), f"./{LOCAL_FILE}")))
        layers.append(("env", read_env(environ)))
    return layers


# --- the merge ---------------------------------------------------------------------------------------
@dataclass
class ResolvedSettings:
    settings: Settings
    sources: dict[str, str]  # setting name (key_of) -> the layer its value came from
    ignored: list[str] = field(default_factory=list)  # layer values that did not apply, and why

    def describe(self) -> str:
        """The effective settings as TOML tables, one ``name = value  # source`` line per setting."""
        width = max(len(name) for model in SECTIONS.values() for name in model.model_fields)
        lines = []
        for section, table in self.settings.model_dump().items():
            lines.append(f"[{section}]")
            lines += [f"{name:<{width}} = {_show(v):<28} # {self.sources[key_of((section, name))]}"
                      for name, v in table.items()]
        return "\n".join(lines + [f"# ignored: {note}" for note in self.ignored])


def _show(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, tuple):
        value = list(value)
    return repr(value) if isinstance(value, str) else str(value).replace("'", '"')


def resolve_settings(cli: Mapping[str, Any] | None = None, config_file: str | Path | None = None, *,
                     base: Mapping[str, Any] | None = None, layered: bool | None = None,
                     environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> ResolvedSettings:
    """Merge the layers (see module docstring) into one validated :class:`Settings`, with each value's source.

    ``cli``: flag values in any form :func:`nest` reads, None meaning "not given". ``base``: an existing
    run's manifest config (nested or flat). ``layered``: read the environment and ``./refusal-atlas.toml``
    (default: when the CLI activated them).
    """
    layered = _LAYERS.active if layered is None else layered
    if config_file is None and layered:
        config_file = _LAYERS.config_file
    defaults = {(s, n): v for s, table in Settings().model_dump().items() for n, v in table.items()}
    merged, sources, ignored = dict(defaults), {p: "default" for p in defaults}, []
    layers = _layers(base, config_file, layered, environ, cwd)
    recorded = dict(layers[0][1]) if base else {}
    for name, values in layers:
        for path, (value, label) in values.items():
            identity = path[0] in RUN_SECTIONS and path[1] in RUN_IDENTITY
            if base and name != "run manifest" and identity and value != recorded.get(path, (defaults[path],))[0]:
                ignored.append(f"{key_of(path)} from {name} (the run's manifest value is kept; pass a CLI flag to "
                               "change it)")
                continue
            merged[path], sources[path] = value, label
    for path, value in nest(_given(cli or {}), "the command line").items():
        merged[path], sources[path] = value, "cli"
    tables: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for (section, name), value in merged.items():
        tables[section][name] = value
    named = {key_of(p): label for p, label in sources.items()}
    try:
        return ResolvedSettings(Settings.model_validate(tables), named, ignored)
    except ValidationError as exc:
        raise _invalid(exc, named) from None


def _invalid(exc: ValidationError, sources: Mapping[str, str], section: str | None = None) -> ConfigError:
    """pydantic's first complaint as one line naming the setting and the layer it came from."""
    first = exc.errors()[0]
    loc = [str(x) for x in first["loc"]]
    if section is not None:
        loc = [section, *loc]
    where = key_of((loc[0], loc[1])) if len(loc) >= 2 and loc[0] in SECTIONS else ".".join(loc) or "settings"
    source = sources.get(where, "")
    return ConfigError(f"invalid setting {where}{f' (from {source})' if source else ''}: {first['msg']}")


def _given(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flag values without the ones not given (None), also inside section tables."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, Mapping):
            table = {k: v for k, v in value.items() if v is not None}
            if table:
                out[key] = table
        elif value is not None:
            out[key] = value
    return out


def load_settings(config_file: str | Path | None = None, values: Mapping[str, Any] | None = None) -> Settings:
    """Defaults < an optional TOML file < ``values`` (None values are ignored); no environment, no manifest."""
    return resolve_settings(values, config_file, layered=False).settings


def run_settings(manifest: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings of a verb on an existing run: its manifest under the layers, ``overrides`` as CLI flags."""
    return resolve_settings(overrides, base=manifest.get("config", {})).settings


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's recorded settings (nested, or flat from before sections) by their flat names."""
    from refusal_atlas.core.rundir import recorded_settings  # core.rundir imports torch: only when asked

    return {name: value for name, value in recorded_settings({"config": config}).items()
            if FLAT.get(name) in RUN_SECTIONS}


# --- the process: runtime knobs, test hooks, secrets ---------------------------------------------------------
def apply_runtime(environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> process.Runtime:
    """Resolve the ``runtime`` section (env > ./refusal-atlas.toml > --config > defaults) and the crash-test
    hooks and hand them to the library (core/runtime.py); returns the previous runtime, for
    :func:`refusal_atlas.core.runtime.restore`. Only this section is validated here, so a bad value of
    another setting fails the verb that reads it, not every verb."""
    values, sources = {}, {}
    for _, layer in _layers(None, _LAYERS.config_file, True, environ, cwd):
        for (section, name), (value, label) in layer.items():
            if section == "runtime":
                values[name], sources[key_of((section, name))] = value, label
    try:
        r = RuntimeSettings(**values)
    except ValidationError as exc:
        raise _invalid(exc, sources, "runtime") from None
    return process.configure(cache=Path(r.cache).expanduser() if r.cache else None, quiet=r.quiet,
                             heartbeat_s=r.heartbeat_s, grace_s=r.grace_s,
                             memory_limit=memory_limit_bytes(r.memory_limit), **test_hooks(environ))


def apply_runtime_once() -> None:
    """:func:`apply_runtime` for the notebook API: once per process, and never over the CLI's."""
    if not _LAYERS.active and not _LAYERS.runtime_applied:
        apply_runtime()
        _LAYERS.runtime_applied = True


def test_hooks(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The crash-test instrumentation (core/crashpoints.py): ``REFUSAL_ATLAS_TEST_KILL_AFTER`` and
    ``REFUSAL_ATLAS_TEST_WORK_LOG``, unset outside tests. Not settings: nothing but a test sets them."""
    env = os.environ if environ is None else environ
    return {"kill_after": env.get(KILL_AFTER_ENV) or None, "work_log": env.get(WORK_LOG_ENV) or None}


test_hooks.__test__ = False  # type: ignore[attr-defined]  # a name pytest would otherwise collect


def endpoint_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The endpoint judge's bearer token: ``$OPENAI_API_KEY`` (the name OpenAI-compatible clients read)."""
    return (os.environ if environ is None else environ).get("OPENAI_API_KEY") or None
