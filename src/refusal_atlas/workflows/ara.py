"""The `train-edit ara` job on a run directory: the ARA-style low-rank edit, trained, saved, optionally as a PEFT adapter.

Reads the run's train prompts (filtered like the run), makes or reuses the harmless retain targets
(R/ara_retain.json: the model's own greedy continuations, as token ids), trains with checkpoints every step under
R/checkpoints/<name>/ (rerunning after a crash resumes; rerunning a finished job recomputes nothing),
and saves R/edits/<name>.json + .safetensors, which `evaluate --edit` and `export --edit` use as they use
any edit. With ``adapter_out`` the edit is also written as the PEFT LoRA it is (A and B as trained).
The trainer itself (directions/ara.py) never sees a run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import atomic_dir, read_json, write_json
from refusal_atlas.directions.ara import AraConfig, AraData, train_ara
from refusal_atlas.directions.checkpoint import checkpointing
from refusal_atlas.directions.optim import TrainConfig
from refusal_atlas.edits.lowrank import LowRankEdit
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.model.generation import DECODING, greedy_generate
from refusal_atlas.settings import AraSettings
from refusal_atlas.workflows.gradient import train_prompts, val_prompts


def ara_config(ara: AraSettings) -> AraConfig:
    return AraConfig(rank=ara.rank, layers=None if ara.layers is None else tuple(ara.layers),
                     components=tuple(ara.components), target_layer=ara.target_layer,
                     shift_weight=ara.shift_weight, retain_weight=ara.retain_weight)


def ara_train_config(ara: AraSettings, seed: int) -> TrainConfig:
    """The optimizer settings of the [ara] section (a bad value fails here, before any model loads)."""
    if ara.n_train < 2 or ara.n_val < 1 or ara.retain_tokens < 1:
        raise ConfigError(f"need n_train >= 2, n_val >= 1 and retain_tokens >= 1, got {ara.n_train}, {ara.n_val}, "
                          f"{ara.retain_tokens}")
    return TrainConfig(steps=ara.steps, batch_size=ara.batch_size, micro_batch=ara.micro_batch, lr=ara.lr,
                       eval_every=ara.eval_every, patience=ara.patience, val_kl_weight=ara.val_kl_weight,
                       seed=seed if ara.seed is None else ara.seed)


def check_ara(ara: AraSettings, seed: int, n_layers: int | None, d_model: int | None) -> None:
    """Every [ara] setting against the run's model shape (from its manifest), in milliseconds."""
    ara_train_config(ara, seed)
    cfg = ara_config(ara)
    if n_layers is not None and d_model is not None:
        cfg.resolve(n_layers, d_model)
    elif ara.rank < 1:
        raise ConfigError(f"rank must be >= 1, got {ara.rank}")


def retain_targets(ws, harmless: list[str], tokens: int) -> list[list[int]]:
    """The model's own greedy continuations of ``harmless`` (``tokens`` each) as token ids, cached in
    R/ara_retain.json (with their text, for reading)."""
    path = ws.run / "ara_retain.json"
    key = {"prompts": harmless, "max_new_tokens": tokens, "decoding": DECODING, "form": "token_ids"}
    if path.is_file():
        doc = read_json(path)
        if isinstance(doc, dict) and doc.get("key") == key and len(doc.get("retain_ids", [])) == len(harmless):
            return [list(ids) for ids in doc["retain_ids"]]
    gens = greedy_generate(ws.adapter, ws.chat, harmless, max_new_tokens=tokens,
                           batch_size=ws.settings.model.batch_size, desc="ara: retain targets")
    ids = [list(g.token_ids) for g in gens]
    text = [ws.chat.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    write_json(path, {"key": key, "retain_ids": ids, "retain": text})
    return ids


def ara_step(ws, ara: AraSettings | None = None, *, name: str = "ara", adapter_out: Path | None = None,
             force: bool = False) -> tuple[LowRankEdit, dict[str, Any] | None]:
    """Train the edit on the run (timed as train_edit_<name>) and save R/edits/<name>; → (edit, adapter summary)."""
    ara = ara or AraSettings()
    train = ara_train_config(ara, ws.settings.data.seed)
    cfg = ara_config(ara).resolve(ws.adapter.n_layers, ws.adapter.d_model)
    batch_size = ws.settings.model.batch_size
    with ws.timed(f"train_edit_{name}"):
        harmful, harmless = train_prompts(ws, ara.n_train)
        retain = retain_targets(ws, harmless, ara.retain_tokens)
        data = AraData(ws.adapter, ws.chat, harmful, harmless, retain, cfg.target_layer, batch_size)
        val_harmful, val_harmless = val_prompts(ws, ara.n_val)
        validation = ValidationObjective(ws.adapter, ws.chat, val_harmful, val_harmless, ws.refusal_ids,
                                         batch_size=batch_size)
        data_info = {"harmful_train": ws.settings.data.harmful_train, "harmless_train": ws.settings.data.harmless_train,
                     "n_train_sampled": ara.n_train, "filtered": ws.settings.data.filter_train,
                     "retain_tokens": ara.retain_tokens, "harmful_val": ws.settings.data.harmful_val,
                     "harmless_val": ws.settings.data.harmless_val, "seed": ws.settings.data.seed}
        identity = {"ara": ara.model_dump(), "data": data_info, "model": ws.run.manifest().get("model", {})}
        with checkpointing(ws.run / "checkpoints" / name, identity):
            edit = train_ara(ws.adapter, ws.chat, data, validation, cfg, train, name=name,
                             meta={"provenance": data_info})
    edit.save(ws.run / "edits" / name)
    ws.run.update_manifest(trained_edits={name: {"edit": edit.edit_type, "rank": edit.rank,
                                                  "layers": edit.meta["ara"]["layers"],
                                                  "best_step": edit.meta["best_step"],
                                                  "stopped": edit.meta["stopped"],
                                                  "seconds": ws.timings.get(f"train_edit_{name}")}})
    summary = write_adapter(ws, edit, adapter_out, force) if adapter_out is not None else None
    return edit, summary


def write_adapter(ws, edit: LowRankEdit, out: Path, force: bool = False) -> dict[str, Any]:
    """``out``/ = the PEFT adapter (A, B as trained) + the edit itself (reproduce/edit_spec), written atomically."""
    from refusal_atlas.export.lora import write_lowrank_adapter

    with atomic_dir(out, force=force) as tmp:
        summary = write_lowrank_adapter(ws.loaded.model, edit, tmp, base_model=ws.loaded.source)
        (tmp / "reproduce").mkdir()
        edit.save(tmp / "reproduce" / "edit_spec")
    return {**summary, "path": str(out)}
