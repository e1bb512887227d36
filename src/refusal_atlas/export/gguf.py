"""Write an in-memory (already edited) model as one GGUF file that transformers and llama.cpp read.

Tensor names come from the ``gguf`` package's name map for the architecture; Llama-layout models get
llama.cpp's rotary permutation of the query/key rows (transformers' GGUF reader undoes it). Metadata
carries the hyper-parameters, the byte-level BPE vocabulary with its merges, the special token ids
and the chat template. Quantization uses what ``gguf.quants`` implements in Python: F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1. As in llama.cpp, 1-D tensors (norms, biases) stay F32, and a matrix
whose rows do not split into whole blocks falls back to F16. The file is written streaming, tensor by
tensor (:func:`write_gguf`), so a 7B model converts inside the memory that holds it.

Mixture-of-experts (Qwen2-MoE as ``qwen2moe``, Qwen3-MoE as ``qwen3moe``): llama.cpp stores a layer's
experts stacked, ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` [E, rows, cols], exactly
transformers 5's fused parameters (its ``gate_up_proj`` [E, 2·inter, d] is split into its gate and up
halves, as views), the router as ``ffn_gate_inp`` and Qwen2-MoE's shared expert as ``ffn_*_shexp`` with
its 1-D gate ``ffn_gate_inp_shexp``. llama.cpp's graphs fix what the config leaves open: every layer is a
MoE layer, qwen2moe never renormalises the top-k router weights and qwen3moe always does, so a model that
differs (``mlp_only_layers``, ``norm_topk_prob``) is refused. Mixtral is not written: llama.cpp reads it as
``llama`` with experts, which transformers' GGUF reader loads as a dense Llama, so no reader here checks it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refusal_atlas.core.errors import ConfigError, ModelError

# model_type -> (GGUF architecture name, llama.cpp rotary permutation of q/k, llama.cpp pre-tokenizer)
GGUF_ARCHS: dict[str, tuple[str, bool, str]] = {
    "qwen2": ("qwen2", False, "qwen2"),
    "qwen3": ("qwen3", False, "qwen2"),
    "llama": ("llama", True, "llama-bpe"),
    # llama.cpp runs Mistral as llama. transformers would read "mistral" in general.name as Mistral but then
    # fails (gguf-py has no "mistral" architecture), so the name is left alone and it reloads as Llama (same maths)
    "mistral": ("llama", True, "llama-bpe"),
    "qwen2_moe": ("qwen2moe", False, "qwen2"),
    "qwen3_moe": ("qwen3moe", False, "qwen2"),
}
# llama.cpp's router: qwen2moe keeps the softmax weights of the chosen experts, qwen3moe renormalises them
_MOE_NORM_TOPK = {"qwen2_moe": False, "qwen3_moe": True}


def _quant_table() -> dict[str, tuple]:
    from gguf import GGMLQuantizationType as Q, LlamaFileType as F

    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
            "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1)}


QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def check_gguf_request(model_type: str | None, quant: str) -> None:
    """Cheap checks (no model needed) so a bad ``--quant`` fails before anything loads."""
    if quant not in QUANT_TYPES:
        raise ConfigError(f"unknown GGUF quantization {quant!r}; the gguf package writes: {', '.join(QUANT_TYPES)}")
    if model_type is not None and model_type not in GGUF_ARCHS:
        raise ConfigError(f"GGUF export supports {', '.join(sorted(GGUF_ARCHS))}; this model is {model_type!r} "
                          "(export safetensors and convert it with llama.cpp's convert_hf_to_gguf.py)")


def check_gguf_config(cfg) -> None:
    """What llama.cpp's graph for the architecture cannot run, from the config alone (before weights load)."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _MOE_NORM_TOPK:
        return
    dense = list(getattr(cfg, "mlp_only_layers", None) or [])
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    if dense or step != 1:
        raise ConfigError(f"GGUF export of {model_type} needs experts in every layer (llama.cpp's "
                          f"{GGUF_ARCHS[model_type][0]}); this model has dense MLP layers (mlp_only_layers={dense}, "
                          f"decoder_sparse_step={step}); export safetensors instead")
    norm = bool(getattr(cfg, "norm_topk_prob", False))
    if norm != _MOE_NORM_TOPK[model_type]:
        raise ConfigError(f"GGUF export of {model_type} needs norm_topk_prob={_MOE_NORM_TOPK[model_type]} (llama.cpp's "
                          f"{GGUF_ARCHS[model_type][0]} fixes it); this model has {norm}; export safetensors instead")


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF→GGUF reordering of the rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise ModelError(f"GGUF export does not write rope scaling {params.get('rope_type')!r} yet; export safetensors")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _add_hparams(w, cfg, name: str, file_type) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    w.add_rope_dimension_count(int(head_dim))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    if cfg.model_type in _MOE_NORM_TOPK:
        w.add_expert_count(int(cfg.num_experts))
        w.add_expert_used_count(int(cfg.num_experts_per_tok))
        w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(int(cfg.shared_expert_intermediate_size))


def _add_tokenizer(w, tokenizer, n_vocab: int, pre: str) -> None:
    """Byte-level BPE vocabulary padded to the embedding rows, merges, special ids, chat template."""
    from gguf import SpecialVocab, TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ModelError("GGUF export writes byte-level BPE tokenizers (Qwen2, Llama-3 style); this tokenizer is "
                         f"{spec.get('model', {}).get('type', type(tokenizer).__name__)}; export safetensors instead")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    if max(by_id) >= n_vocab:
        raise ModelError(f"tokenizer has ids up to {max(by_id)} but the model only {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="gguf-tok.") as tmp:
        tokenizer.save_pretrained(tmp)
        special = SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
        if tokenizer.chat_template and not special.chat_template:
            special.chat_template = tokenizer.chat_template
        if tokenizer.pad_token_id is not None and "pad" not in special.special_token_ids:
            special.special_token_ids["pad"] = int(tokenizer.pad_token_id)
        special.add_to_gguf(w, quiet=True)


@dataclass(frozen=True)
class _Planned:
    """One tensor of the file: its GGUF name, the model tensor, how it is stored, and its size in the file."""

    name: str
    tensor: torch.Tensor
    qtype: object  # GGMLQuantizationType actually stored (1-D tensors and ragged rows stay wider)
    byte_shape: tuple[int, ...]
    np_dtype: np.dtype
    nbytes: int
    permute_heads: int | None  # llama.cpp's rotary row order for q/k (heads), else None


def _storage(shape: tuple[int, ...], qtype):
    """(stored type, byte shape, numpy dtype) of a tensor of ``shape`` asked for as ``qtype``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) == 1 or qtype == Q.F32:
        return Q.F32, shape, np.dtype(np.float32)
    if qtype == Q.F16 or shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return Q.F16, shape, np.dtype(np.float16)
    block, type_size = GGML_QUANT_SIZES[qtype]
    return qtype, (*shape[:-1], shape[-1] // block * type_size), np.dtype(np.uint8)


CHUNK_ELEMENTS = 1 << 24  # rows converted at a time: 64 MB of float32 per step, whatever the matrix


def _encoded(p: _Planned) -> np.ndarray:
    """The bytes of one tensor as stored, converted and quantized a block of rows at a time (rows quantize
    independently, so the result is the same as quantizing the whole matrix at once, without its float32 copy)."""
    from gguf import GGMLQuantizationType as Q, quants

    t = p.tensor.detach()
    if p.permute_heads is not None:
        t = torch.from_numpy(_rope_permute(t.to("cpu", torch.float32).numpy(), p.permute_heads))
    if t.ndim == 1:
        return t.to("cpu", torch.float32).numpy().astype(p.np_dtype)
    out = np.empty((t.numel() // t.shape[-1], p.byte_shape[-1]), dtype=p.np_dtype)
    done = 0
    # stacked experts one at a time: each expert's rows are contiguous even when the tensor is a view (a half of
    # gate_up_proj), so no copy of the whole stack is made
    for matrix in (t.unbind(0) if t.ndim == 3 else [t]):
        rows = matrix.reshape(-1, matrix.shape[-1])
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])
        for i in range(0, rows.shape[0], step):
            block = rows[i:i + step].to("cpu", torch.float32).numpy()
            out[done:done + len(block)] = block if p.qtype == Q.F32 else (
                block.astype(np.float16) if p.qtype == Q.F16 else quants.quantize(block, p.qtype))
            done += len(block)
    return out.reshape(p.byte_shape)


def _gguf_tensors(names, hf_name: str, tensor: torch.Tensor, modules: dict) -> list[tuple[str | None, torch.Tensor]]:
    """(GGUF name, tensor) pairs for one state-dict entry: a fused expert parameter (no ``.weight`` suffix) maps
    as a whole, its gate_up_proj as two halves; a Qwen2-MoE shared-expert gate [1, d] is stored 1-D, as
    llama.cpp reads it."""
    if tensor.ndim == 3:
        module_name, _, param = hf_name.rpartition(".")
        if getattr(modules.get(module_name), "is_transposed", False):
            raise ModelError(f"GGUF export writes experts as [E, out, in]; {hf_name} is stored transposed; "
                             "export safetensors instead")
        if param == "gate_up_proj":
            inter = tensor.shape[1] // 2
            pairs = [(names.get_name(f"{module_name}.gate_proj"), tensor.narrow(1, 0, inter)),
                     (names.get_name(f"{module_name}.up_proj"), tensor.narrow(1, inter, inter))]
        else:
            pairs = [(names.get_name(hf_name), tensor)]
        return [(None if n is None else f"{n}.weight", t) for n, t in pairs]
    base, _, suffix = hf_name.rpartition(".")
    name = names.get_name(base)
    if base.endswith("shared_expert_gate"):
        tensor = tensor.reshape(-1)
    return [(None if name is None else f"{name}.{suffix}", tensor)]


def plan_gguf(model: torch.nn.Module, quant: str) -> list[_Planned]:
    """Every tensor the GGUF file of ``model`` at ``quant`` will hold, in file order, without converting any."""
    from gguf import get_tensor_name_map, MODEL_ARCH_NAMES

    cfg = model.config
    check_gguf_request(cfg.model_type, quant)
    check_gguf_config(cfg)
    arch, permute, _ = GGUF_ARCHS[cfg.model_type]
    qtype = _quant_table()[quant][0]
    f32 = _quant_table()["f32"][0]
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    modules = dict(model.named_modules())
    plan = []
    for hf_name, whole in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight is read back as tied
        base = hf_name.rpartition(".")[0]
        heads = (n_head if base.endswith("q_proj") else n_kv) if permute and base.endswith(
            ("self_attn.q_proj", "self_attn.k_proj")) else None
        for gguf_name, tensor in _gguf_tensors(names, hf_name, whole, modules):
            if gguf_name is None:
                raise ModelError(f"no GGUF name for tensor {hf_name!r} of {cfg.model_type}; export safetensors instead")
            # routers stay F32, as llama.cpp's converter and quantizer keep them: a rounded router logit can change
            # which experts a token uses, a discrete jump far larger than the rounding itself
            router = gguf_name.split(".")[-2] in ("ffn_gate_inp", "ffn_gate_inp_shexp")
            stored, byte_shape, np_dtype = _storage(tuple(tensor.shape), f32 if router else qtype)
            nbytes = int(np.prod(byte_shape, dtype=np.int64)) * np_dtype.itemsize
            plan.append(_Planned(gguf_name, tensor, stored, byte_shape, np_dtype, nbytes, heads))
    return plan


def gguf_size(model: torch.nn.Module, quant: str) -> int:
    """Bytes of tensor data the GGUF file will hold (the metadata adds a few MB: the vocabulary)."""
    return sum(p.nbytes for p in plan_gguf(model, quant))


def write_gguf(model: torch.nn.Module, tokenizer, path: str | os.PathLike, quant: str = "f16",
               name: str | None = None) -> Path:
    """Write ``model`` (its current, possibly edited weights) and ``tokenizer`` to the GGUF file ``path``.

    Streaming: gguf-py writes the header, metadata and tensor table from the planned shapes, then each
    tensor is converted (and quantized) a block of rows at a time and appended, so the memory this needs
    beyond the model is one tensor in its stored type.
    """
    from gguf import GGUFWriter

    cfg = model.config
    plan = plan_gguf(model, quant)
    arch, _, pre = GGUF_ARCHS[cfg.model_type]
    file_type = _quant_table()[quant][1]
    label = name or getattr(cfg, "_name_or_path", "") or cfg.model_type
    if cfg.model_type == "mistral":
        if getattr(cfg, "sliding_window", None) and cfg.sliding_window < cfg.max_position_embeddings:
            raise ModelError("GGUF export of Mistral with a sliding window is not supported (it reloads as Llama)")
        label = label.lower().replace("mistral", "m-istral")  # see GGUF_ARCHS
    path = Path(path)
    w = GGUFWriter(str(path), arch)
    _add_hparams(w, cfg, label, file_type)
    if quant not in ("f32", "f16", "bf16"):
        w.add_quantization_version(2)
    _add_tokenizer(w, tokenizer, int(cfg.vocab_size), pre)
    for p in plan:
        w.add_tensor_info(p.name, p.byte_shape, p.np_dtype, p.nbytes, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    align = w.data_alignment
    # the tensor data by plain writes (numpy's tofile, which gguf-py uses, reports a full disk without errno)
    with open(path, "ab") as fh:
        for p in plan:
            fh.write(bytes(-fh.tell() % align))
            data = _encoded(p)
            fh.write(np.ascontiguousarray(data).data)
            del data
        fh.write(bytes(-fh.tell() % align))
    return path
