"""Write a weight edit as a PEFT LoRA adapter for the *original* model.

Generic: for every module whose weight differs between the original and the edited model, the
difference is factored by a truncated SVD at its numerical rank, so any edit that changes weights
(not only ablation) can ship as an adapter. Plain ablation of k directions changes each
out-projection by ``-BᵀB W`` and the embedding by ``-E BᵀB``, rank k; a norm-preserving edit
(projection followed by rescaling every row back to its old norm) changes every row, so its exact
adapter has full rank, min(d_out, d_in) — as large as the weights; ``max_rank`` then truncates and
the adapter records the relative error it leaves.

Tied embeddings: the edit changes the input embedding but not the unembedding, and merging an
embedding LoRA into a tied model would write into the shared matrix and edit both. The adapter
therefore lists ``lm_head`` in ``modules_to_save`` with the original unembedding, which unties it
on load (PEFT keeps its own copy) — exact, at the cost of one vocab × d matrix in the adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from refusal_atlas.core.errors import ModelError

PREFIX = "base_model.model."


@dataclass
class Snapshot:
    """The weights before an edit (the reference for the difference) and whether embeddings were tied."""

    state: dict[str, torch.Tensor]
    tied_embeddings: bool


def snapshot(model: torch.nn.Module) -> Snapshot:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    return Snapshot({k: v.detach().clone() for k, v in model.state_dict().items()}, tied)


def _factor(delta: torch.Tensor, max_rank: int | None, rel_tol: float = 1e-5):
    """delta [out, in] ≈ B @ A with the smallest rank reaching ``rel_tol`` (float64).

    The right singular vectors come from the Gram matrix of the shorter side (an embedding delta is
    vocab × d: a d × d eigenproblem instead of a full SVD); projecting onto them is exact up to rounding.
    """
    d = delta.to(torch.float64)
    wide = d.shape[0] < d.shape[1]
    m = d.T if wide else d  # [long, short]
    evals, vecs = torch.linalg.eigh(m.T @ m)
    s = evals.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)
    keep = int((s > rel_tol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    rank = max(1, min(keep, max_rank) if max_rank else keep)
    err = float(s[rank:].norm() / s.norm().clamp_min(1e-300))
    v = vecs[:, :rank]
    mv = m @ v  # m ≈ (m v) vᵀ
    return (v, mv.T, err) if wide else (mv, v.T, err)


def lora_factors(original: dict[str, torch.Tensor], model: torch.nn.Module, max_rank: int | None = None) -> dict:
    """{module name: (kind, B [out, r], A [r, in], relative error)} for every edited weight."""
    modules = dict(model.named_modules())
    out = {}
    for name, new in model.state_dict().items():
        old = original.get(name)
        if old is None or torch.equal(old, new):
            continue
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if param != "weight" or not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            raise ModelError(f"LoRA export cannot carry an edit of {name!r} ({type(module).__name__}.{param}): "
                             "only Linear and Embedding weights; export safetensors or gguf instead")
        delta = new.to(torch.float64) - old.to(torch.float64)
        if isinstance(module, torch.nn.Embedding):
            b, a, err = _factor(delta.T, max_rank)  # [d, V] = B [d, r] @ A [r, V]
            out[module_name] = ("embedding", b, a, err)
        else:
            b, a, err = _factor(delta, max_rank)
            out[module_name] = ("linear", b, a, err)
    if not out:
        raise ModelError("the edit changed no weights; nothing to write as a LoRA adapter")
    return out


def _write_adapter(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], base_model: str, rank: int,
                   modules: list[str], modules_to_save: list[str] | None) -> None:
    """adapter_model.safetensors + adapter_config.json (lora_alpha = r: PEFT's scale is 1, the merge is W + B·A)."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": modules, "modules_to_save": modules_to_save,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    out_dir = Path(out_dir)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_lora(before: Snapshot, model: torch.nn.Module, out_dir: str | os.PathLike,
               base_model: str, max_rank: int | None = None) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir``; returns a summary."""
    original = before.state
    factors = lora_factors(original, model, max_rank)
    rank = max(b.shape[1] for _, b, _, _ in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, (kind, b, a, _) in factors.items():
        pad = rank - b.shape[1]  # zero columns/rows change nothing, and give one rank for every module
        b = torch.nn.functional.pad(b, (0, pad)).to(torch.float32).contiguous()
        a = torch.nn.functional.pad(a, (0, 0, 0, pad)).to(torch.float32).contiguous()
        if kind == "embedding":
            tensors[f"{PREFIX}{name}.lora_embedding_A"], tensors[f"{PREFIX}{name}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
    modules_to_save = None
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if any(kind == "embedding" for kind, *_ in factors.values()) and before.tied_embeddings:
        modules_to_save = [head_name]
        tensors[f"{PREFIX}{head_name}.weight"] = original[f"{head_name}.weight"].to(torch.float32).contiguous()
    _write_adapter(out_dir, tensors, base_model, rank, sorted(factors), modules_to_save)
    return {"rank": rank, "modules": len(factors), "untied_lm_head": modules_to_save is not None,
            "max_relative_error": max(err for *_, err in factors.values())}


def write_lowrank_adapter(model: torch.nn.Module, edit, out_dir: str | os.PathLike, base_model: str) -> dict:
    """Write a low-rank edit (:class:`~refusal_atlas.edits.lowrank.LowRankEdit`) as the PEFT adapter it is.

    No difference or SVD: each target projection's trained A [r, d_in] and B [d_out, r] become its
    ``lora_A.weight`` / ``lora_B.weight`` (PEFT's names, under ``base_model.model.``), with ``r`` = the rank and
    ``lora_alpha`` = r, so PEFT's scale alpha / r is 1 and the merged weight is W + B·A, the edit's weight form.
    ``model`` (the original, unedited) gives the projections' module names; ``out_dir`` must exist.
    """
    from refusal_atlas.edits.lowrank import projection
    from refusal_atlas.model.adapter import ModelAdapter

    adapter = ModelAdapter(model)
    edit.check_model(adapter)
    names = {id(m): n for n, m in model.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    for target, (a, b) in edit.factors.items():
        name = names[id(projection(adapter, target))]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(torch.float32).contiguous()
    modules = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    _write_adapter(out_dir, tensors, base_model, edit.rank, modules, None)
    return {"rank": edit.rank, "modules": len(modules), "exact": True}
