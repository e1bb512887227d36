"""Re-score an exported artifact (safetensors dir, LoRA adapter on its base, GGUF) against the original model.

What people run is a LoRA or a quantized GGUF, not the hooks the direction was measured with, so
``evaluate --model EXPORTED`` generates with the exported weights and judges refusal on the same
held-out prompts, next to the run's own interventions (hook ablation) on the original model, and
measures KL(original ‖ exported) on harmless prompts, teacher-forced on the original's greedy
continuation. Prompts are encoded with the run's chat formatter: the exported model has the same
vocabulary (the GGUF tokenizer round trip is tested separately), so differences come from weights.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

from refusal_atlas.data import load_prompts
from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.evaluation.completions import completions_for
from refusal_atlas.evaluation.damage import continuation_kl, kl_records
from refusal_atlas.evaluation.evaluate import EvalPlan, dataset_role, evaluate_run, judged_record
from refusal_atlas.evaluation.judges import JudgeItem
from refusal_atlas.edits import NoEdit
from refusal_atlas.core.io import read_json
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.loading import LoadedModel, load_model


def exported_kind(path: Path) -> str:
    """gguf | lora | safetensors, checked without loading anything."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if not path.is_dir():
        raise ConfigError(f"exported model not found: {path} (pass an export directory or a .gguf file)")
    if (path / "adapter_config.json").is_file():
        return "lora"
    if len(list(path.glob("*.gguf"))) == 1:
        return "gguf"
    if (path / "config.json").is_file():
        return "safetensors"
    raise ConfigError(f"{path} holds no model: expected config.json (safetensors), adapter_config.json (LoRA) "
                      "or one .gguf file")


def load_exported(path: Path, base: str | None = None, device: str | None = None,
                  dtype: str | None = None) -> LoadedModel:
    """Load an export; a LoRA adapter is merged into its base (``base`` or adapter_config's base_model_name_or_path)."""
    path = Path(path)
    kind = exported_kind(path)
    if kind == "gguf":
        file = path if path.is_file() else next(path.glob("*.gguf"))
        return load_model(str(file), device=device, dtype=dtype)
    if kind == "safetensors":
        return load_model(str(path), device=device, dtype=dtype)
    base = base or read_json(path / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/adapter_config.json names no base model; pass --base")
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError("loading a LoRA adapter needs peft: pip install 'refusal-atlas[lora]'") from None
    loaded = load_model(base, device=device, dtype=dtype)
    merged = PeftModel.from_pretrained(loaded.model, str(path)).merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    return LoadedModel(merged, loaded.tokenizer, f"{path.name}+{loaded.name}", str(path), {**loaded.info, "base": base})


def _fingerprint(path: Path) -> str:
    """Identifies the artifact in completion caches: its bundle's file list, else sizes and mtimes."""
    listing = path / "reproduce" / "files.json"
    if listing.is_file():
        return hashlib.sha256(listing.read_bytes()).hexdigest()[:10]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)
    return hashlib.sha256(stamp.encode()).hexdigest()[:10]


class ExportedModel(NoEdit):
    """Runs the forward pass on the exported model instead of the original.

    No edit of the original (kind ``none``: nothing to hook, no directions to key completions by); the
    exported weights are the change, named by the label (``model:<format>:<name>@<files hash>``) and
    recorded as kind ``exported``.
    """

    def __init__(self, model, path: Path, kind: str):
        super().__init__()
        self.label = f"model:{kind}:{path.name}@{_fingerprint(path)}"
        self.model, self.path, self.export_kind = model, path, kind

    @contextmanager
    def apply(self, adapter: ModelAdapter):
        original = adapter.model
        adapter.model = self.model
        try:
            yield
        finally:
            adapter.model = original

    def describe(self) -> dict:
        return {"intervention": self.label, "kind": "exported", "format": self.export_kind, "model": str(self.path)}


def evaluate_exported(adapter: ModelAdapter, chat: ChatFormatter, run: RunDir, plan: EvalPlan, path: Path, *,
                      base: str | None = None, device: str | None = None, dtype: str | None = None,
                      model_name: str = "model") -> list[dict]:
    """The plan's interventions on the original model (``adapter``), then the exported model, loaded on
    ``device`` in ``dtype``, on the same prompts + KL; records go to ``run``'s metrics.json."""
    records = evaluate_run(adapter, chat, run, plan, model_name)
    path = Path(path)
    exported = load_exported(path, base=base, device=device, dtype=dtype)
    spec = ExportedModel(exported.model, path, exported_kind(path))
    clean, out = NoEdit(), []
    ModelAdapter(exported.model)  # the exported architecture must be one we can read
    for name in plan.datasets:
        prompts, role = load_prompts(name, n=plan.n, seed=plan.seed), dataset_role(name)
        comp = completions_for(adapter, chat, prompts, spec, plan.max_new_tokens, plan.gen_batch,
                               run.completions_path(name, spec.label), desc=f"generate {name} [{spec.label}]")
        items = [JudgeItem(p.instruction, r) for p, r in zip(prompts, comp.responses)]
        group = [judged_record(spec, name, role, judge, judge.judge(items, role), comp.responses, plan.max_new_tokens)
                 for judge in plan.judges]
        if role == "harmless":
            length = max(plan.max_new_tokens, plan.kl_tokens)
            ref = completions_for(adapter, chat, prompts, clean, length, plan.gen_batch,
                                  run.completions_path(name, clean.label), desc=f"generate {name} [none]")
            kl = continuation_kl(adapter, chat, [p.instruction for p in prompts],
                                 [ids[: plan.kl_tokens] for ids in ref.token_ids], spec,
                                 batch_size=max(1, plan.batch_size // 2), desc=f"KL {name} [{spec.label}]")
            group += [{**spec.describe(), "dataset": name, "role": role, "judge": None, **r}
                      for r in kl_records(kl, plan.kl_tokens)]
        run.add_metrics(group)
        out += group
    return records + out
