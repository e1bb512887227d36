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

Mixture-of-experts: transformers 5 stores a block's experts as fused 3-D parameters ([E, out, in], or
[E, in, out] where the module says ``is_transposed``), not Linear modules, so PEFT cannot target them as
modules. It targets them as parameters (``target_parameters``, PEFT's ParamWrapper), with one rank-r pair
per expert packed into ``lora_A`` [E·r, in] (expert-major rows) and ``lora_B`` [out, r·E] (expert-minor
columns: PEFT reshapes it to [out, r, E]). Ablating k directions changes each expert's down-projection by
a rank-k matrix, so every expert is factored exactly like a Linear. Per-expert Linear layouts and Qwen2-MoE's
shared expert are ordinary ``target_modules``. What PEFT's LoRA cannot express is refused by name: a change
of a bias (experts with ``down_proj_bias``, biased Linears), of a 1-D tensor, or of two parameters of one
module (PEFT would nest wrappers, which this writer does not lay out).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

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


def _expert_factors(delta: torch.Tensor, transposed: bool, max_rank: int | None):
    """A fused 3-D delta → (B [E, out, r], A [E, r, in], error): each expert's [out, in] change factored alone,
    padded to the largest expert rank (zero columns change nothing)."""
    pairs = [_factor(d.T if transposed else d, max_rank) for d in delta]  # [out, in] per expert
    rank = max(b.shape[1] for b, _, _ in pairs)
    b = torch.stack([torch.nn.functional.pad(b, (0, rank - b.shape[1])) for b, _, _ in pairs])
    a = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0])) for _, a, _ in pairs])
    norms = [float(d.norm()) for d in delta]  # the whole tensor's relative error from each expert's
    total = sum(n ** 2 for n in norms)
    lost = sum((err * n) ** 2 for (_, _, err), n in zip(pairs, norms))
    return b, a, (lost / total) ** 0.5 if total > 0 else 0.0


def lora_factors(original: dict[str, torch.Tensor], model: torch.nn.Module, max_rank: int | None = None) -> dict:
    """{name: (kind, B, A, relative error)} for every edited weight: kind "linear" / "embedding" keyed by the
    module's name (B [out, r], A [r, in]), kind "parameter" keyed by the parameter's full name (a fused 3-D
    expert tensor: B [E, out, r], A [E, r, in]; a 2-D parameter of a non-Linear module: B [out, r], A [r, in])."""
    modules = dict(model.named_modules())
    out = {}
    by_module: dict[str, str] = {}
    for name, new in model.state_dict().items():
        old = original.get(name)
        if old is None or torch.equal(old, new):
            continue
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        delta = new.to(torch.float64) - old.to(torch.float64)
        if isinstance(module, torch.nn.Embedding) and param == "weight":
            b, a, err = _factor(delta.T, max_rank)  # [d, V] = B [d, r] @ A [r, V]
            out[module_name] = ("embedding", b, a, err)
        elif isinstance(module, torch.nn.Linear) and param == "weight":
            b, a, err = _factor(delta, max_rank)
            out[module_name] = ("linear", b, a, err)
        elif new.ndim in (2, 3) and "bias" not in param and not isinstance(module, (nn.Linear, nn.Embedding)):
            if module_name in by_module:
                raise ModelError(f"LoRA export cannot carry edits of two parameters of {module_name!r} "
                                 f"({by_module[module_name]!r} and {param!r}): PEFT would nest its parameter "
                                 "wrappers; export safetensors or gguf instead")
            by_module[module_name] = param
            if new.ndim == 3:
                b, a, err = _expert_factors(delta, bool(getattr(module, "is_transposed", False)), max_rank)
            else:
                b, a, err = _factor(delta, max_rank)
            out[name] = ("parameter", b, a, err)
        else:
            what = "a bias (PEFT's LoRA adds B·A to weights only)" if "bias" in param else f"a {new.ndim}-D tensor"
            raise ModelError(f"LoRA export cannot carry an edit of {name!r} ({type(module).__name__}.{param}, {what}): "
                             "only Linear and Embedding weights and 2-D/3-D weight parameters such as fused experts; "
                             "export safetensors or gguf instead")
    if not out:
        raise ModelError("the edit changed no weights; nothing to write as a LoRA adapter")
    return out


def _write_adapter(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], base_model: str, rank: int,
                   modules: list[str], modules_to_save: list[str] | None, parameters: list[str] | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json (lora_alpha = r: PEFT's scale is 1, the merge is W + B·A)."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": modules, "modules_to_save": modules_to_save,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    if parameters:
        config["target_parameters"] = parameters
    out_dir = Path(out_dir)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _pack_experts(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert B [E, out, r'] and A [E, r', in] → PEFT's lora_B [out, rank·E] and lora_A [E·rank, in].

    PEFT reads lora_A as [E, rank, in] (row e·rank + i) and lora_B as [out, rank, E] (column i·E + e)."""
    pad = rank - b.shape[2]
    b = torch.nn.functional.pad(b, (0, pad))  # [E, out, rank]
    a = torch.nn.functional.pad(a, (0, 0, 0, pad))  # [E, rank, in]
    return b.permute(1, 2, 0).reshape(b.shape[1], -1), a.reshape(-1, a.shape[2])


def write_lora(before: Snapshot, model: torch.nn.Module, out_dir: str | os.PathLike,
               base_model: str, max_rank: int | None = None) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir``; returns a summary."""
    original = before.state
    factors = lora_factors(original, model, max_rank)
    rank = max(b.shape[-1] for _, b, _, _ in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, (kind, b, a, _) in factors.items():
        if b.ndim == 3:  # fused experts: one rank-``rank`` pair per expert
            b, a = _pack_experts(b, a, rank)
        else:  # zero columns/rows change nothing, and give one rank for every module
            b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
            a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
        b, a = b.to(torch.float32).contiguous(), a.to(torch.float32).contiguous()
        if kind == "parameter":  # PEFT keys a targeted parameter by its module: the name without the parameter
            module_name = name.rpartition(".")[0]
            tensors[f"{PREFIX}{module_name}.lora_A.weight"], tensors[f"{PREFIX}{module_name}.lora_B.weight"] = a, b
        elif kind == "embedding":
            tensors[f"{PREFIX}{name}.lora_embedding_A"], tensors[f"{PREFIX}{name}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
    modules_to_save = None
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if any(kind == "embedding" for kind, *_ in factors.values()) and before.tied_embeddings:
        modules_to_save = [head_name]
        tensors[f"{PREFIX}{head_name}.weight"] = original[f"{head_name}.weight"].to(torch.float32).contiguous()
    parameters = sorted(n for n, (kind, *_) in factors.items() if kind == "parameter")
    modules = sorted(n for n, (kind, *_) in factors.items() if kind != "parameter")
    _write_adapter(out_dir, tensors, base_model, rank, modules, modules_to_save, parameters)
    return {"rank": rank, "modules": len(modules), "parameters": len(parameters),
            "untied_lm_head": modules_to_save is not None,
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
