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


from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.refusal import refusal_token_ids
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.loading import LoadedModel, load_model
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.core.seeding import seed_everything
from refusal_atlas.settings import Settings, run_settings
from refusal_atlas.workflows.validate import (check_memory, check_model_settings, check_new_run_dir, check_run_dir,
                                              check_run_settings)


@dataclass
class PromptSets:
    harmful_train: list[Prompt]
    harmless_train: list[Prompt]
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]
    eval_harmful: dict[str, list[Prompt]]
    eval_harmless: list[Prompt]


def load_prompt_sets(settings: Settings) -> PromptSets:
    """All prompt sets of a run, sampled reproducibly from ``data.seed``."""
    data, ev = settings.data, settings.evaluation

    def get(name: str, n: int) -> list[Prompt]:
        return load_prompts(name, n=n, seed=data.seed)

    return PromptSets(
        harmful_train=get(data.harmful_train, data.n_train),
        harmless_train=get(data.harmless_train, data.n_train),
        harmful_val=get(data.harmful_val, data.n_val),
        harmless_val=get(data.harmless_val, data.n_val),
        eval_harmful={name: get(name, ev.n_eval) for name in ev.eval_harmful},
        eval_harmless=get(ev.eval_harmless, ev.n_eval),
    )


@dataclass
class Workspace:
    settings: Settings
    run: RunDir
    loaded: LoadedModel
    adapter: ModelAdapter
    chat: ChatFormatter
    refusal_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    _vllm: object | None = field(default=None, repr=False)
    _judge: object | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    def candidate_layers(self) -> list[int]:
        selection = self.settings.selection
        if selection.layers is not None:
            return [self.adapter.check_layer(l) for l in selection.layers]
        return list(range(self.n_layers // 3, int(self.n_layers * (1 - selection.prune_layer_frac))))

    def generation_backend(self, name: str | None = None):
        """The held-out generation engine (``name``, default the ``evaluation.backend`` setting): None for HF
        with hooks; vLLM is made on first use, one per workspace, generating from CPU copies of the run's
        model in its dtype."""
        if (name or self.settings.evaluation.backend) == "hf":
            return None
        if self._vllm is None:
            from refusal_atlas.export.vllm import VllmBackend

            rt = self.settings.runtime
            self._vllm = VllmBackend.for_model(self.settings.model.model, dtype=self.loaded.info.get("dtype", "bfloat16"),
                                               seed=self.settings.data.seed, tensor_parallel=rt.vllm_tp,
                                               gpu_memory=rt.vllm_gpu_memory)
        return self._vllm

    def judge(self, name: str | None = None):
        """The judge ``name`` (default: of the run's reported rates, the ``evaluation.judge`` setting), built on
        first use."""
        name = name or self.settings.evaluation.judge
        if self._judge is None or getattr(self._judge, "name", None) != name:
            from refusal_atlas.evaluation.judges import JudgeOptions, make_judges

            opts = JudgeOptions(cache_dir=self.run / "judgements", device=self.settings.model.device)
            self._judge = make_judges([name], opts)[0]
        return self._judge

    @contextmanager
    def timed(self, step: str):
        start = time.perf_counter()
        yield
        self.timings[step] = round(time.perf_counter() - start, 2)
        self.run.update_manifest(timings_s={step: self.timings[step]})


def open_workspace(settings: Settings, run_dir: str | Path, *, must_exist: bool = False,
                   allowed: Iterable[str] = (), load_dtype: str | None = None, generates: bool = False,
                   memory_extra: dict[str, int] | None = None) -> Workspace:
    """Validate ``settings`` and the run directory, load the model, then create (or reopen) the run directory.

    ``load_dtype`` loads the model in another dtype for this verb only (the search scores trials in
    bfloat16 where that is faster); the run's recorded dtype, which export and evaluate use, is kept.

    Before the model loads, the job's memory is estimated (:func:`~refusal_atlas.workflows.validate.check_memory`:
    ``generates`` adds held-out generation's batch and KV cache, ``memory_extra`` the verb's own buffers): a job
    that cannot fit stops here, one whose batch does not fit runs at a smaller one.

    Reopening a run with settings that would make its artifacts stale is an error (see
    :func:`refusal_atlas.workflows.validate.check_run_settings`); the settings in ``allowed`` (those the
    calling verb recomputes) may change and are recorded in the manifest.
    """
    run_path = Path(run_dir)
    manifest = check_run_dir(run_path) if must_exist else check_new_run_dir(run_path)
    check_run_settings(run_path, manifest, settings.flat(), allowed)
    facts = check_model_settings(settings)
    settings = check_memory(settings, load_dtype=load_dtype, generates=generates, extra=memory_extra)
    seed_everything(settings.data.seed)
    m, selection = settings.model, settings.selection
    template = None
    if m.chat_template is not None:
        try:
            template = Path(m.chat_template).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read chat template {m.chat_template}: {exc.strerror}") from None
    loaded = load_model(m.model, device=m.device, dtype=load_dtype or m.dtype, device_map=m.device_map,
                        max_memory=m.max_memory, dtype_fallback=m.dtype_fallback)
    adapter = ModelAdapter(loaded.model)
    chat = ChatFormatter(loaded.tokenizer, system=m.system_prompt, chat_template=template)
    if facts is None:  # a Hugging Face id: its layer count is known only now
        for layer in (selection.layers or []) + ([selection.layer] if selection.layer is not None else []):
            adapter.check_layer(layer)
    chat.positions(selection.positions)
    refusal_ids = refusal_token_ids(loaded.tokenizer)
    run = RunDir(run_path, create=True)
    if not must_exist:
        info = {"name": loaded.name, "source": loaded.source, "n_layers": adapter.n_layers,
                "d_model": adapter.d_model, "model_type": adapter.model_type, "refusal_token_ids": refusal_ids,
                "eoi_tokens": chat.eoi_ids, **loaded.info}
        run.init_manifest(settings.run_config(), info)
    elif manifest and manifest.get("config") != settings.run_config():  # allowed overrides reach the manifest;
        run.replace_manifest(config=settings.run_config())  # an old flat config is rewritten in sections
    return Workspace(settings, run, loaded, adapter, chat, refusal_ids)


def reopen_workspace(run_dir: str | Path, overrides: dict | None = None, *, allowed: Iterable[str] = (),
                     load_dtype: str | None = None, generates: bool = False,
                     memory_extra: dict[str, int] | None = None) -> Workspace:
    """Reopen an existing run (never a new one: a mistyped path must not load a model or make a directory)
    with its manifest's settings under the layers, ``overrides`` as CLI flags."""
    settings = run_settings(check_run_dir(run_dir), overrides)
    return open_workspace(settings, run_dir, must_exist=True, allowed=allowed, load_dtype=load_dtype,
                          generates=generates, memory_extra=memory_extra)
