"""Models placed by accelerate: device-map and memory options, where inputs go, offloaded weights.

``--device-map`` / ``--max-memory`` are handed to accelerate through ``from_pretrained``. With CPU or
disk offload, accelerate replaces a module's parameters by meta tensors and keeps their values in a
weights map (a RAM dict, or memory-mapped files), loading them for each forward only. Hooks work
unchanged (accelerate moves activations; interventions move their tensors to ``x.device``), but
three things must know about it: the device inputs go to (the embedding's *execution* device, not
``meta``), weight edits (written back to the weights map, or they would be lost at the next
forward) and exports (values read from the weights map, not the meta placeholders).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from refusal_atlas.core.errors import ConfigError, ModelError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)$", re.IGNORECASE)


def _device_key(text: str) -> int | str:
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text in ("cpu", "disk", "mps") or re.fullmatch(r"(cuda|xpu|npu):\d+", text):
        return text
    raise ConfigError(f"unknown device {text!r} (use a GPU index like 0, cuda:1, cpu or disk)")


def parse_device_map(value: str | dict | None) -> str | dict[str, int | str] | None:
    """A strategy (auto, balanced, balanced_low_0, sequential), a JSON file, or a {module: device} dict."""
    if value is None or isinstance(value, dict) and not value:
        return None
    if isinstance(value, str):
        if value in DEVICE_MAP_STRATEGIES:
            return value
        path = Path(value).expanduser()
        if not value.endswith(".json") or not path.is_file():
            raise ConfigError(f"--device-map {value!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} or an "
                              "existing .json file mapping module names to devices")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read device map {path}: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError("a device map must be a JSON object {module name: device}")
    return {name: _device_key(str(dev)) for name, dev in value.items()}


def parse_max_memory(value: str | dict | None) -> dict[int | str, str] | None:
    """``0=20GiB,cpu=64GiB`` (or a dict) → accelerate's max_memory {device: size}."""
    if value is None or value == "" or value == {}:
        return None
    items = value.items() if isinstance(value, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in value.split(",") if part.strip())
    out: dict[int | str, str] = {}
    for dev, size in items:
        size = str(size).strip()
        if not _MEMORY.match(size):
            raise ConfigError(f"--max-memory entry {dev}={size!r}: expected DEVICE=SIZE like 0=20GiB or cpu=64GiB")
        out[_device_key(str(dev))] = size.replace(" ", "")
    return out


def uses_disk(device_map, max_memory) -> bool:
    """Whether accelerate may offload to disk (then it needs an offload folder)."""
    return isinstance(device_map, str) and max_memory is not None or (
        isinstance(device_map, dict) and "disk" in device_map.values())


def describe_placement(model: nn.Module) -> dict:
    """What a run manifest records about placement: the device of each module group and its count."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {}
    counts: dict[str, int] = {}
    for dev in device_map.values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return {"device_map": {str(k): str(v) for k, v in device_map.items()}, "modules_per_device": counts}


# --- runtime: hooks, offloaded weights -----------------------------------------------------------
def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else its first real tensor's."""
    for hook in _hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def is_offloaded(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _offload_owner(root: nn.Module, name: str):
    """(hook, name relative to the hooked module) of the nearest ancestor that offloads tensor ``name``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        for hook in _hooks(root.get_submodule(".".join(parts[:i]))):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                return hook, ".".join(parts[i:])
    raise ModelError(f"{name} is on the meta device but no accelerate offload hook holds its values")


def offloaded_value(root: nn.Module, name: str) -> torch.Tensor:
    hook, rel = _offload_owner(root, name)
    return hook.weights_map[rel]


def _store(weights_map, key: str, value: torch.Tensor) -> None:
    dataset = getattr(weights_map, "dataset", weights_map)
    key = getattr(weights_map, "prefix", "") + key
    target = getattr(dataset, "state_dict", dataset)  # OffloadedWeightsLoader: its RAM dict has priority
    if not isinstance(target, dict):
        raise ModelError(f"cannot write an edited weight back to accelerate's {type(dataset).__name__}")
    target[key] = value


@contextmanager
def editable_tensor(root: nn.Module, module: nn.Module, attr: str) -> Iterator[torch.Tensor]:
    """``module.<attr>`` ready for in-place edits; with offload, the edit is written back to the weights map."""
    tensor = getattr(module, attr)
    if tensor.device.type != "meta":
        yield tensor.data
        return
    name = next(n for n, m in root.named_modules() if m is module) + "." + attr
    hook, rel = _offload_owner(root, name.lstrip("."))
    value = hook.weights_map[rel].detach().to("cpu").clone()
    yield value
    _store(hook.weights_map, rel, value)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every offloaded (meta) entry replaced by its stored value."""
    state = model.state_dict()
    return {name: offloaded_value(model, name) if t.device.type == "meta" else t for name, t in state.items()}


def dispatch_loaded(model: nn.Module, device_map, max_memory, offload_folder: str | None) -> nn.Module:
    """Place an already-loaded model (GGUF files are de-quantized in RAM first) with accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    if isinstance(device_map, str):
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map, offload_dir=offload_folder)
