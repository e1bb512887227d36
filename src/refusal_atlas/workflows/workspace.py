"""Workspace: a loaded model + its adapter, chat format and refusal tokens + a run directory.

Opening one validates everything a run depends on (datasets, model, chat template, layers)
*before* the run directory is created, so bad input never leaves a half-made run behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


from refusal_atlas.config import RunConfig
from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.refusal import refusal_token_ids
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.loading import LoadedModel, load_model
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.core.seeding import seed_everything
from refusal_atlas.workflows.validate import check_model_settings, check_new_run_dir, check_run_dir, check_run_settings


@dataclass
class PromptSets:
    harmful_train: list[Prompt]
    harmless_train: list[Prompt]
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]
    eval_harmful: dict[str, list[Prompt]]
    eval_harmless: list[Prompt]


def load_prompt_sets(cfg: RunConfig) -> PromptSets:
    """All prompt sets of a run, sampled reproducibly from ``cfg.seed``."""
    def get(name: str, n: int) -> list[Prompt]:
        return load_prompts(name, n=n, seed=cfg.seed)

    return PromptSets(
        harmful_train=get(cfg.harmful_train, cfg.n_train),
        harmless_train=get(cfg.harmless_train, cfg.n_train),
        harmful_val=get(cfg.harmful_val, cfg.n_val),
        harmless_val=get(cfg.harmless_val, cfg.n_val),
        eval_harmful={name: get(name, cfg.n_eval) for name in cfg.eval_harmful},
        eval_harmless=get(cfg.eval_harmless, cfg.n_eval),
    )


@dataclass
class Workspace:
    cfg: RunConfig
    run: RunDir
    loaded: LoadedModel
    adapter: ModelAdapter
    chat: ChatFormatter
    refusal_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    def candidate_layers(self) -> list[int]:
        if self.cfg.layers is not None:
            return [self.adapter.check_layer(l) for l in self.cfg.layers]
        return list(range(self.n_layers // 3, int(self.n_layers * (1 - self.cfg.prune_layer_frac))))

    @contextmanager
    def timed(self, step: str):
        start = time.perf_counter()
        yield
        self.timings[step] = round(time.perf_counter() - start, 2)
        self.run.update_manifest(timings_s={step: self.timings[step]})


def open_workspace(cfg: RunConfig, run_dir: str | Path, *, must_exist: bool = False,
                   allowed: Iterable[str] = (), load_dtype: str | None = None) -> Workspace:
    """Validate ``cfg`` and the run directory, load the model, then create (or reopen) the run directory.

    ``load_dtype`` loads the model in another dtype for this verb only (the search scores trials in
    bfloat16 where that is faster); the run's recorded dtype, which export and evaluate use, is kept.

    Reopening a run with settings that would make its artifacts stale is an error (see
    :func:`refusal_atlas.workflows.validate.check_run_settings`); the settings in ``allowed`` (those the
    calling verb recomputes) may change and are recorded in the manifest.
    """
    run_path = Path(run_dir)
    manifest = check_run_dir(run_path) if must_exist else check_new_run_dir(run_path)
    check_run_settings(run_path, manifest, cfg.model_dump(), allowed)
    facts = check_model_settings(cfg)
    seed_everything(cfg.seed)
    template = None
    if cfg.chat_template is not None:
        try:
            template = Path(cfg.chat_template).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read chat template {cfg.chat_template}: {exc.strerror}") from None
    loaded = load_model(cfg.model, device=cfg.device, dtype=load_dtype or cfg.dtype, device_map=cfg.device_map,
                        max_memory=cfg.max_memory, dtype_fallback=cfg.dtype_fallback)
    adapter = ModelAdapter(loaded.model)
    chat = ChatFormatter(loaded.tokenizer, system=cfg.system_prompt, chat_template=template)
    if facts is None:  # a Hugging Face id: its layer count is known only now
        for layer in (cfg.layers or []) + ([cfg.layer] if cfg.layer is not None else []):
            adapter.check_layer(layer)
    chat.positions(cfg.positions)
    refusal_ids = refusal_token_ids(loaded.tokenizer)
    run = RunDir(run_path, create=True)
    if not must_exist:
        info = {"name": loaded.name, "source": loaded.source, "n_layers": adapter.n_layers,
                "d_model": adapter.d_model, "model_type": adapter.model_type, "refusal_token_ids": refusal_ids,
                "eoi_tokens": chat.eoi_ids, **loaded.info}
        run.init_manifest(cfg.model_dump(), info)
    elif manifest and manifest.get("config") != cfg.model_dump():  # allowed overrides reach the manifest
        run.update_manifest(config=cfg.model_dump())
    return Workspace(cfg, run, loaded, adapter, chat, refusal_ids)
