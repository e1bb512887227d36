"""How much memory a job on a model needs, worked out from the model's files before anything loads.

The parts, each from the model's configuration and weight headers (never the weights):

* **weights**: parameters as stored (a tied unembedding once) × bytes of the dtype they are loaded in;
* **loading**: a checkpoint in the load dtype is memory-mapped and becomes the weights; one in another dtype
  (a bfloat16 file loaded in float32, the CPU default) stays mapped while every tensor is converted, so for
  a moment both are resident (measured: a 2.5 GB float32 file loaded in bfloat16 peaks at 4.1 GB). A GGUF
  file is de-quantized to float32 first;
* **runtime**: Python, torch, transformers and the tokenizer (about 0.6 GiB, measured in bench/scaling.py);
* **activations** of one forward pass at the batch size: the hidden states, the MLP's three intermediate
  tensors, attention, and the LM head's logits for the last position of every row (float32). Batches are
  capped by padded tokens (``budget_batches``), so rows are counted at :data:`TOKENS_PER_ROW` tokens;
* **KV cache** of generation: keys and values of every layer for the generation batch, prompt + new tokens;
* whatever the job adds (an export's largest converted tensor, the copy a LoRA export keeps, ...).

A job peaks either while loading (weights + loading + runtime) or while working (everything else); the
estimate is the larger. Arithmetic only: importing this module pulls in neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from refusal_atlas.core.resources import format_size

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float64": 8}
_HEADER_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                 "F8_E4M3": 1, "F8_E5M2": 1}
RUNTIME_BYTES = 640 * 2**20
TOKENS_PER_ROW = 64  # prompt tokens per batch row: the shipped sets' chat-formatted prompts are 20-60 tokens


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about a model, read from its files."""

    n_params: int
    file_bytes: int  # the weights on disk
    file_dtype: str | None  # float32 | bfloat16 | float16 | "gguf" (quantized) | None (mixed or unknown)
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int  # the widest MLP (a MoE's shared expert or dense layers)
    vocab: int
    tied: bool
    largest_tensor: int  # elements of the largest weight (an export converts one at a time)


def _config_shape(cfg: dict, n_params: int, file_bytes: int, file_dtype: str | None, largest: int) -> ModelShape:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    d = int(text["hidden_size"])
    heads = int(text.get("num_attention_heads") or 1)
    inter = max(int(text.get(k) or 0) for k in ("intermediate_size", "shared_expert_intermediate_size",
                                                  "moe_intermediate_size"))
    return ModelShape(n_params=n_params, file_bytes=file_bytes, file_dtype=file_dtype,
                      n_layers=int(text["num_hidden_layers"]), d_model=d, n_heads=heads,
                      n_kv_heads=int(text.get("num_key_value_heads") or heads),
                      head_dim=int(text.get("head_dim") or d // heads), intermediate=inter or 4 * d,
                      vocab=int(text.get("vocab_size") or 0),
                      tied=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
                      largest_tensor=largest)


def shape_from_dir(path: Path) -> ModelShape | None:
    """A local model directory (config.json + safetensors); None when it holds no safetensors weights."""
    from refusal_atlas.model.files import safetensors_header

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = sorted(path.glob("*.safetensors"))
    if not files or not isinstance(cfg, dict) or "hidden_size" not in (cfg.get("text_config") or cfg):
        return None
    n = size = largest = 0
    dtypes = set()
    for f in files:
        for name, t in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in t["shape"]:
                count *= dim
            n, size, largest = n + count, size + count * _HEADER_BYTES.get(t["dtype"], 4), max(largest, count)
            dtypes.add(t["dtype"])
    file_dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(next(iter(dtypes))) \
        if len(dtypes) == 1 else None
    return _config_shape(cfg, n, size, file_dtype, largest)


def shape_from_gguf(path: Path) -> ModelShape | None:
    """A GGUF file: tensor shapes from its table, dimensions from its metadata (gguf-py reads the header only)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception:  # a damaged file is reported by check_gguf, not here
        return None

    def meta(key: str):
        f = reader.fields.get(key)
        return None if f is None or not f.data else f.parts[f.data[0]].tolist()[0]

    arch = reader.fields.get("general.architecture")
    arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else ""
    n = largest = 0
    names = set()
    vocab = 0
    for t in reader.tensors:
        n, largest = n + int(t.n_elements), max(largest, int(t.n_elements))
        names.add(t.name)
        if t.name == "token_embd.weight":
            vocab = int(max(t.shape))
    d = meta(f"{arch}.embedding_length")
    if not d:
        return None
    cfg = {"hidden_size": d, "num_hidden_layers": meta(f"{arch}.block_count") or 0,
           "num_attention_heads": meta(f"{arch}.attention.head_count"),
           "num_key_value_heads": meta(f"{arch}.attention.head_count_kv"),
           "intermediate_size": meta(f"{arch}.feed_forward_length"), "vocab_size": vocab,
           "tie_word_embeddings": "output.weight" not in names}
    return _config_shape(cfg, n, path.stat().st_size, "gguf", largest)


EMBEDDED_CONFIG = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}
EMBEDDED_PARAMS = 494_032_768  # Qwen2.5(-Coder)-0.5B, stored as float32 in the cache


def model_shape(spec: str) -> ModelShape | None:
    """The shape of ``spec`` (embedded, a directory, a .gguf file, or a Hugging Face id already in the local
    cache); None when its files cannot be read here (then no estimate is made)."""
    if spec == "embedded":
        from refusal_atlas.model.embedded import embedded_cache_dir

        cached = embedded_cache_dir()
        if (cached / "COMPLETE").is_file():
            found = shape_from_dir(cached)
            if found is not None:
                return found
        return _config_shape(EMBEDDED_CONFIG, EMBEDDED_PARAMS, EMBEDDED_PARAMS * 4, "float32", 151936 * 896)
    path = Path(spec).expanduser()
    if path.is_file() and spec.endswith(".gguf"):
        return shape_from_gguf(path)
    if path.is_dir():
        return shape_from_dir(path)
    try:
        from huggingface_hub import snapshot_download

        return shape_from_dir(Path(snapshot_download(spec, local_files_only=True)))
    except Exception:  # not in the local cache (or not an id at all): nothing to read before loading
        return None


# --- the estimate ------------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Peak resident memory of a job, by part (bytes); :attr:`total` is the larger of loading and working."""

    weights: int
    runtime: int
    loading: int = 0  # extra while loading only
    parts: dict[str, int] = field(default_factory=dict)  # extra while working: activations, caches, the job's own
    notes: dict[str, str] = field(default_factory=dict)  # how a part was sized, for the message

    @property
    def total(self) -> int:
        return self.weights + self.runtime + max(self.loading, sum(self.parts.values()))

    @property
    def fixed(self) -> int:
        """What no batch size changes: the total without activations and KV cache."""
        parts = {k: v for k, v in self.parts.items() if k not in ("activations", "KV cache")}
        return self.weights + self.runtime + max(self.loading, sum(parts.values()))

    def describe(self) -> str:
        items = [("weights", self.weights), ("runtime", self.runtime), *self.parts.items()]
        if self.loading > sum(self.parts.values()):
            items = [("weights", self.weights), ("runtime", self.runtime), ("loading", self.loading)]
        return " + ".join(f"{name} {format_size(b)}" + (f" ({self.notes[name]})" if name in self.notes else "")
                          for name, b in items if b)


def forward_bytes(s: ModelShape, dtype_bytes: int, rows: int, tokens_per_row: int = TOKENS_PER_ROW) -> int:
    """Transient memory of one forward pass of ``rows`` prompts: hidden states, MLP, attention, last-row logits."""
    t = rows * tokens_per_row
    hidden = 4 * t * s.d_model * dtype_bytes
    mlp = 3 * t * s.intermediate * dtype_bytes
    attention = t * (s.n_heads + 2 * s.n_kv_heads) * s.head_dim * dtype_bytes + \
        rows * s.n_heads * tokens_per_row * 2 * tokens_per_row * 4  # scores over prefix + prompt, float32
    logits = 2 * rows * s.vocab * 4  # the last position's logits and their log-softmax, float32
    return hidden + mlp + attention + logits


def kv_cache_bytes(s: ModelShape, dtype_bytes: int, rows: int, length: int) -> int:
    return 2 * s.n_layers * rows * length * s.n_kv_heads * s.head_dim * dtype_bytes


def estimate(s: ModelShape, dtype: str, *, batch_size: int, generation: tuple[int, int] | None = None,
             extra: dict[str, int] | None = None) -> MemoryEstimate:
    """Peak memory of a job: forward passes at ``batch_size``; ``generation`` = (batch, new tokens) when the
    job generates; ``extra``: the job's own parts (an export's buffers)."""
    db = DTYPE_BYTES[dtype]
    est = MemoryEstimate(weights=s.n_params * db, runtime=RUNTIME_BYTES)
    count = f"{s.n_params / 1e9:.2f}B" if s.n_params >= 1e8 else f"{s.n_params / 1e6:.2f}M"
    est.notes["weights"] = f"{count} parameters in {dtype}"
    if s.file_dtype == "gguf":
        est.loading = s.file_bytes + s.n_params * 4
        est.notes["loading"] = "the GGUF file and its float32 de-quantization"
    elif s.file_dtype != dtype:
        est.loading = s.file_bytes
        est.notes["loading"] = f"the {s.file_dtype or 'mixed-dtype'} file mapped while converting to {dtype}"
    act = forward_bytes(s, db, batch_size)
    kv = 0
    if generation is not None:
        rows, new = generation
        act = max(act, forward_bytes(s, db, rows))
        kv = kv_cache_bytes(s, db, rows, TOKENS_PER_ROW + new)
        est.notes["KV cache"] = f"{rows} rows × {TOKENS_PER_ROW} + {new} tokens"
    est.parts["activations"] = act
    est.notes["activations"] = f"batch {batch_size}" + (f", generation batch {generation[0]}" if generation else "")
    if kv:
        est.parts["KV cache"] = kv
    for name, b in (extra or {}).items():
        est.parts[name] = b
    return est


def largest_batch(s: ModelShape, dtype: str, budget: int, batch_size: int, generation: tuple[int, int] | None,
                  extra: dict[str, int] | None) -> tuple[int, tuple[int, int] | None] | None:
    """The largest (batch, generation batch) reached by halving, each time, whichever of the two needs more
    memory, whose estimate fits ``budget``; None when even batch 1 does not fit."""
    db = DTYPE_BYTES[dtype]
    b, g = batch_size, generation
    while estimate(s, dtype, batch_size=b, generation=g, extra=extra).total > budget:
        gen_cost = forward_bytes(s, db, g[0]) + kv_cache_bytes(s, db, g[0], TOKENS_PER_ROW + g[1]) if g else 0
        if g is not None and g[0] > 1 and (gen_cost >= forward_bytes(s, db, b) or b == 1):
            g = (g[0] // 2, g[1])
        elif b > 1:
            b //= 2
        else:
            return None
    return b, g
