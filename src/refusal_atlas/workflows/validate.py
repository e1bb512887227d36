"""Input checks that every verb runs before it loads a model or creates a directory.

A research run costs minutes to hours, so a typo must cost milliseconds: run directories, model
paths (config, tokenizer, weight headers — never the weights), devices, layers, counts, prompt
files and direction files are checked here from what is on disk. So are memory and disk: a job whose
estimate (model/memory.py) exceeds the memory it can count on stops before loading, or runs at a
smaller batch when only its batch does not fit; an export checks the free disk for its output first.
Importing this module pulls in neither torch nor transformers; the few checks that need torch import
it when called.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_atlas.core.errors import ArtifactError, ConfigError, ModelError, ResourceError

if TYPE_CHECKING:
    from refusal_atlas.model.files import ModelFacts
    from refusal_atlas.settings import Settings

log = logging.getLogger(__name__)

# Settings whose change makes a run directory's artifacts stale, with the artifacts they feed.
# Anything not listed (evaluation sizes, devices, batch sizes) may change on an existing run.
_ANY_ARTIFACT = ("activations.safetensors", "directions", "completions", "metrics.json", "study.db",
                 "targets.json", "selection.json")
STAGE_SETTINGS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("model", "dtype", "system_prompt", "chat_template", "seed"), _ANY_ARTIFACT),
    (("harmful_train", "harmless_train", "n_train", "filter_train"), ("activations.safetensors",)),
    (("harmful_val", "harmless_val", "n_val", "layers", "positions", "kl_threshold", "induce_threshold",
      "prune_layer_frac", "strict_filters", "layer"), ("directions/dim.safetensors",)),
)
EXTRACTION_SETTINGS = frozenset(STAGE_SETTINGS[1][0])
SELECTION_SETTINGS = frozenset(STAGE_SETTINGS[2][0])
# The embedded Qwen2.5-Coder-0.5B-Instruct, known without converting or loading it.
EMBEDDED_FACTS = ("qwen2", 24, 896)


# --- run directories ----------------------------------------------------------------------------------
def check_run_dir(path: str | os.PathLike, require_manifest: bool = True) -> dict[str, Any]:
    """An existing, writable run directory made by refusal-atlas → its manifest.

    Verbs that never load a model (``directions dim|som``) work on artifacts alone and pass
    ``require_manifest=False``; they get ``{}`` when there is none.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"run directory not found: {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not a run directory")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file() and not require_manifest:
        _check_writable(path)
        return {}
    if not manifest_path.is_file():
        what = "empty, " if not any(path.iterdir()) else ""
        raise ConfigError(f"{path} is {what}not a run directory (no manifest.json); run `refusal-atlas run -r {path}` "
                          "first")
    manifest = _read_manifest(manifest_path)
    _check_writable(path)
    return manifest


def check_new_run_dir(path: str | os.PathLike) -> dict[str, Any] | None:
    """A path a run may create or continue: missing, empty, or a run directory (→ its manifest)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} is a file, not a run directory; choose another --run-dir")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return check_run_dir(path)
        if any(path.iterdir()):
            raise ArtifactError(f"{path} exists, is not empty and is not a run directory (no manifest.json); "
                                "choose a new --run-dir")
        _check_writable(path)
        return None
    check_output_parent(path, "run directory")
    return None


def check_output_parent(path: str | os.PathLike, what: str = "output directory") -> None:
    """The nearest existing folder above ``path`` is a writable directory, so ``path`` can be made."""
    path = Path(path)
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ArtifactError(f"cannot create {what} {path}: {parent} is a file")
    _check_writable(parent, f"cannot create {what} {path}: {parent} is not writable")


def _check_writable(path: Path, message: str | None = None) -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise ArtifactError(message or f"run directory {path} is not writable")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:  # plain json, not refusal_atlas.core.io: that module imports torch, and this check must take milliseconds
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt JSON in {path}: {exc}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise ArtifactError(f"{path} was not written by refusal-atlas (no 'config' object); "
                            f"{path.parent} is not a run directory")
    return manifest


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Stage settings that differ between a run's recorded config and a new one → (old, new)."""
    names = [n for names, _ in STAGE_SETTINGS for n in names]
    return {n: (old.get(n), new.get(n)) for n in names if n in new and not _same(n, old.get(n), new.get(n))}


def _same(name: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if name in ("model", "chat_template") and isinstance(a, str) and isinstance(b, str):
        return Path(a).expanduser().exists() and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def check_run_settings(run_dir: str | os.PathLike, manifest: Mapping[str, Any] | None, new: Mapping[str, Any],
                       allowed: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Refuse settings that would make the run directory's artifacts stale or mixed.

    A setting may differ from the run's recorded one only when no artifact it feeds exists yet, or
    when the verb recomputes that step (``allowed``). Returns the differences that are allowed, which
    the caller records in the manifest.
    """
    if not manifest:
        return {}
    from refusal_atlas.settings import Settings, flat_config

    run_dir, allowed = Path(run_dir), set(allowed)
    # an unrecorded setting had its default; a manifest from before the sections holds them flat
    recorded = {**Settings().flat(), **flat_config(manifest.get("config", {}))}
    diff = changed_settings(recorded, new)
    stale = {}
    for names, artifacts in STAGE_SETTINGS:
        made = [a for a in artifacts if _made(run_dir / a)]
        for name in names:
            if name in diff and name not in allowed and made:
                stale[name] = diff[name]
    if stale:
        detail = "; ".join(f"{k}: {old!r} (run) vs {new_!r} (now)" for k, (old, new_) in stale.items())
        raise ConfigError(f"run directory {run_dir} was made with other settings ({detail}); its artifacts would "
                          "be reused or mixed. Use a new --run-dir, or the run's own settings (`run --resume` "
                          "without those flags)")
    return diff


def _made(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


# --- models -----------------------------------------------------------------------------------------
def check_model(spec: str, chat_template: str | None = None, require_template: bool = True) -> ModelFacts | None:
    """Check a model spec from its files; None for a Hugging Face id (checked when it loads)."""
    from refusal_atlas.model.files import ModelFacts, check_gguf, check_model_dir, is_local_model

    if spec == "embedded":
        return ModelFacts(*EMBEDDED_FACTS, has_chat_template=True, n_experts=0)
    if not is_local_model(spec):
        return None
    path = Path(spec).expanduser()
    if not path.exists():  # the spec as typed (Path drops a leading ./)
        raise ModelError(f"{'GGUF file' if spec.endswith('.gguf') else 'model directory'} not found: {spec}")
    facts = check_gguf(path) if spec.endswith(".gguf") else check_model_dir(path)
    if chat_template is not None:
        if not Path(chat_template).expanduser().is_file():
            raise ConfigError(f"chat template file not found: {chat_template}")
    elif facts.has_chat_template is False and require_template:
        raise ModelError(f"the tokenizer of {spec} has no chat template; refusal directions are defined relative to "
                         "the chat format, so pass one: `run --chat-template FILE` (a Jinja template)")
    _check_architecture(facts.model_type)
    return facts


def _check_architecture(model_type: str | None) -> None:
    if model_type is None:
        return
    from refusal_atlas.model.adapter import FAMILIES

    if model_type not in FAMILIES:
        raise ModelError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")


def check_moe_only(option: str, facts: ModelFacts | None) -> None:
    """An option that edits mixture-of-experts blocks (``--router``) on a model whose files say it has none."""
    if facts is not None and facts.n_experts == 0:
        raise ConfigError(f"{option} applies to mixture-of-experts models only; this model "
                          f"({facts.model_type or 'unknown architecture'}) has no experts")


def check_layers(layers: Sequence[int | None], facts: ModelFacts | None, what: str = "layer") -> None:
    n = facts.n_layers if facts else None
    for layer in layers:
        if layer is None:
            continue
        if layer < 0 or (n is not None and layer >= n):
            top = f"0..{n - 1}" if n is not None else "0 and up"
            raise ConfigError(f"{what} {layer} is out of range: this model has layers {top}")


def check_device(device: str | None) -> None:
    if device is not None:
        from refusal_atlas.model.loading import check_device as check

        check(device)


def check_dtype(dtype: str | None) -> None:
    table = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
    if dtype is not None and dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(table)}")


def check_model_settings(settings: Settings) -> ModelFacts | None:
    """Model, chat template, device, dtype and candidate layers of the settings, before the model loads."""
    m, selection = settings.model, settings.selection
    facts = check_model(m.model, m.chat_template)
    check_dtype(m.dtype)
    check_device(m.device)
    check_layers(list(selection.layers or []) + [selection.layer], facts)
    return facts


# --- counts, datasets, directions, endpoints ---------------------------------------------------------
def check_at_least(**values: tuple[int | float | None, int | float]) -> None:
    """``check_at_least(n=(n, 1))``: every given value must be >= its minimum (None: not given)."""
    for name, (value, minimum) in values.items():
        if value is not None and value < minimum:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be >= {minimum}, got {value}")


def check_datasets(names: Iterable[str], n: int | None = None, seed: int = 0) -> None:
    """Parse every named set or file now, so a malformed one fails before any work."""
    from refusal_atlas.data import load_prompts

    for name in names:
        load_prompts(name, n=n, seed=seed)


def check_direction_file(path: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A run's direction file fits the run's model (width d_model, layer in range) → its header."""
    if not path.is_file():
        raise ArtifactError(f"this step needs a direction file, and {path} does not exist; run `refusal-atlas run` "
                            "or `select` first, or pass --directions NAME of a file under directions/")
    from refusal_atlas.model.files import safetensors_header

    header = safetensors_header(path, ArtifactError)
    shape = header.get("vectors", {}).get("shape")
    try:
        meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
    except ValueError:
        meta = {}
    if not isinstance(shape, list) or len(shape) != 2 or "layer" not in meta:
        raise ArtifactError(f"{path} is not a DirectionSet file")
    model = manifest.get("model", {})
    d_model, n_layers = model.get("d_model"), model.get("n_layers")
    if d_model is not None and shape[1] != d_model:
        raise ConfigError(f"{path.name} holds directions of width {shape[1]}, but the run's model has "
                          f"d_model {d_model}")
    layer = meta["layer"]
    if n_layers is not None and not (isinstance(layer, int) and 0 <= layer < n_layers):
        raise ConfigError(f"{path.name} is for layer {layer}, but the run's model has layers 0..{n_layers - 1}")
    return {"k": shape[0], "d": shape[1], "layer": layer}


def check_endpoint(url: str, model: str | None, timeout: float) -> None:
    """Something listens at the judge endpoint's host:port (a TCP connect, a few seconds at most)."""
    from refusal_atlas.evaluation.judges.endpoint import EndpointJudge

    EndpointJudge(url, model or "", timeout=min(timeout, 5.0)).check_reachable()



# --- memory and disk ------------------------------------------------------------------------------------------
def _load_dtype(settings: Settings, load_dtype: str | None) -> str | None:
    """The dtype name the model will be loaded in on CPU, None when it goes elsewhere (GPU, a device map):
    then accelerate and the GPU's own memory decide, and this RAM check does not apply."""
    m = settings.model
    if m.device_map is not None:
        return None
    if m.device is None:  # the default device is CUDA when torch sees a GPU; without an NVIDIA driver it is the CPU
        if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists():
            import torch

            if torch.cuda.is_available():
                return None
    elif not m.device.startswith("cpu"):
        return None
    name = load_dtype or m.dtype
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name) if name not in (None, "auto") \
        else "float32"


_SAID: set[str] = set()


def check_memory(settings: Settings, *, load_dtype: str | None = None, generates: bool = False,
                 extra: Mapping[str, int] | None = None, what: str = "this job") -> Settings:
    """Stop a job that would not fit in memory before its model loads, or shrink its batches until it fits.

    The estimate (:func:`refusal_atlas.model.memory.estimate`) is compared with the ``memory_limit`` setting,
    else with the memory free now (MemAvailable, or a container's cgroup limit). If the weights and the job's
    own buffers alone exceed it: a :class:`ResourceError` naming the estimate. If only the batch does: the
    largest batch size (and generation batch) that fits, said on stderr and returned in the settings.
    """
    from refusal_atlas.core.resources import available_memory, format_size
    from refusal_atlas.core.runtime import runtime
    from refusal_atlas.model.memory import estimate, largest_batch, model_shape

    limit = runtime().memory_limit
    dtype = _load_dtype(settings, load_dtype) if limit != 0 else None
    shape = model_shape(settings.model.model) if dtype is not None else None
    if shape is None:
        return settings
    m, ev = settings.model, settings.evaluation
    gen = (ev.generation_batch_size, ev.max_new_tokens) if generates else None
    est = estimate(shape, dtype, batch_size=m.batch_size, generation=gen, extra=dict(extra or {}))
    budget, source = (limit, "the memory_limit setting") if limit else available_memory()
    if est.total <= budget:
        return settings
    fits = largest_batch(shape, dtype, budget, m.batch_size, gen, dict(extra or {}))
    if fits is None:
        hint = "load it in bfloat16 (--dtype bfloat16: half the weights' memory), " if dtype == "float32" else ""
        raise ResourceError(f"{what} needs about {format_size(est.total)} of memory ({est.describe()}), but "
                            f"{format_size(budget)} is available ({source}), so it would be killed part-way; {hint}"
                            "use a smaller model or a machine with more memory (memory_limit = \"off\" skips this "
                            "check)")
    batch, generation = fits
    message = (f"memory: {what} needs about {format_size(est.total)} at batch size {m.batch_size}"
               f"{f' (generation batch {gen[0]})' if gen else ''}, more than the {format_size(budget)} available "
               f"({source}); running at batch size {batch}"
               f"{f' (generation batch {generation[0]})' if generation else ''} instead")
    if message not in _SAID:  # a verb checks before its heavy imports and again as the model loads: say it once
        _SAID.add(message)
        log.warning(message)
    model = m.model_copy(update={"batch_size": batch})
    evaluation = ev.model_copy(update={"generation_batch_size": generation[0]}) if generation else ev
    return settings.model_copy(update={"model": model, "evaluation": evaluation})


_QUANT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                "q5_0": 22 / 32, "q5_1": 24 / 32}
WORK_SLAB = 64 * 2**20 * 4  # the float32 row blocks an export converts and quantizes at a time, with temporaries


def export_needs(settings: Settings, fmt: str, quant: str | None, dtype: str | None) -> tuple[dict[str, int], int] | None:
    """(memory the export adds to the loaded model, by part; bytes it writes) for ``fmt``, None when the model's
    files cannot be read here. An ablation unties tied embeddings (the unembedding keeps the original), so a tied
    model gains one vocabulary × d matrix in memory and in the output."""
    from refusal_atlas.model.memory import DTYPE_BYTES, model_shape

    shape = model_shape(settings.model.model)
    if shape is None:
        return None
    load = _load_dtype(settings, None) or "float32"
    db = DTYPE_BYTES[load]
    head = shape.vocab * shape.d_model if shape.tied else 0
    parts = {"untied unembedding": head * db} if head else {}
    if fmt == "safetensors":
        out = DTYPE_BYTES.get(dtype or shape.file_dtype or "float32", 4)
        if out != db:
            parts["one converted tensor"] = shape.largest_tensor * out
        return parts, (shape.n_params + head) * out + 2**20
    if fmt == "gguf":
        q = _QUANT_BYTES[quant or "f16"]
        parts["one converted tensor"] = int(shape.largest_tensor * max(q, 2.0)) + WORK_SLAB
        return parts, int((shape.n_params + head) * q) + 32 * 2**20  # + the vocabulary and merges
    # lora: the original weights are kept beside the edited ones, and the largest difference factored in float64
    parts["weights before the edit"] = shape.n_params * db
    parts["one difference in float64"] = 3 * shape.largest_tensor * 8
    return parts, head * 4 + 64 * 2**20


def check_disk(path: str | os.PathLike, needed: int, what: str) -> None:
    """``needed`` bytes (plus 5 % and 64 MB of slack) must be free on the file system of ``path``."""
    from refusal_atlas.core.resources import format_size, free_disk

    free = free_disk(path)
    if needed * 1.05 + 64 * 2**20 > free:
        raise ResourceError(f"{what} writes about {format_size(needed)} to {path}, but only {format_size(free)} is "
                            "free there; free some space or choose another --out")
