"""How time and memory grow with the model: every stage, 0.5B to 7B shapes, each in its own process.

The cost of a stage depends on the shapes, not on the weights' values, so random-weight models with the real
architectures' configurations measure it honestly. The configurations are those of the public ``config.json``
files of Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct and of Qwen/Qwen1.5-MoE-A2.7B-Chat (written from the
published configs and checked against verbatim copies quoted in public repositories found with a code search:
the 0.5B and 7B files, the 3B's in Qwen2.5-Omni-3B's text config, the MoE in several). The MoE keeps every
field of Qwen1.5-MoE-A2.7B but 16 of its 60 experts (top-4 routing, the shared expert, 24 layers), so its 5.2B
parameters fit in bfloat16 here; its active parameters per token are those of the real model. The tokenizer
is the embedded model's (Qwen2.5's byte-level BPE, 151,665 tokens), copied from its cache.

Each model is written once (seeded random weights, bfloat16 safetensors, streamed tensor by tensor); then
every stage runs in a CHILD process that loads the model the way a user's command does and runs the stage
through the same workflow functions the CLI calls, while the parent reads the child's peak RSS from
``wait4`` (``ru_maxrss``: resident pages, file-backed ones of a memory-mapped checkpoint included):

  load        load_model (+ the dtype check's forward pass)
  extract     `extract`: 128 + 128 train prompts, every layer, the refusal filter off
  select      `select` on one DIM candidate (the middle layer, last position) at 100 + 100 validation prompts
  search      `search edits --trials 1` at 100 + 100 (JailbreakBench + harmless_val): set-up and one trial
  generate    100 × 64 greedy tokens (JailbreakBench, one batch of 100)
  export_*    `export` of the run's DIM ablation as safetensors (source dtype), GGUF f16 and GGUF q8_0

A stage's own time excludes its model load (timed inside the child). Its floor: for forward passes the
matmul FLOPs actually run (every Linear's rows as they pass, the experts' routed rows; attention score
FLOPs, < 2 % at these lengths, are left out) over a plain matmul's rate of the model's MLP shape measured in
this run; for decoding the larger of that and the weight bytes read per step over the memory stream rate
(a 1 GiB copy, bytes read + written, measured in this run); for export and load the bytes read and written
over the stream rate. ``ratio`` = time / floor: 1 would be the machine's limit.

Resumable per (model, dtype, stage): each finished stage is a JSON file under ``--work``; a rerun skips it.
Model files are deleted after their stages unless ``--keep-models`` (disk: the 7B is 15 GB, its export 15 GB).
``--collect`` measures nothing and writes the table, JSON and plot of the stages finished so far.

    .venv/bin/python bench/scaling.py [--models qwen2.5-0.5b,...] [--dtypes bfloat16,float32] [--work DIR]
        [--out docs/results/data/<date>_scaling] [--collect]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# --- the configurations --------------------------------------------------------------------------------------
_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=131072,
              max_window_layers=28, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645)
CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": {**_QWEN2, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_window_layers": 21},
    "qwen2.5-1.5b": {**_QWEN2, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_window_layers": 21},
    "qwen2.5-3b": {**_QWEN2, "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
                   "tie_word_embeddings": True, "max_window_layers": 70},
    "qwen2.5-7b": {**_QWEN2, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False},
    # Qwen1.5-MoE-A2.7B with 16 of its 60 experts (see the module docstring)
    "qwen1.5-moe-16e": {**_QWEN2, "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
                        "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "intermediate_size": 5632, "moe_intermediate_size": 1408,
                        "shared_expert_intermediate_size": 5632, "num_experts": 16, "num_experts_per_tok": 4,
                        "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
                        "vocab_size": 151936, "tie_word_embeddings": False, "max_window_layers": 21,
                        "sliding_window": 32768},
    # for the bench's own test: the same machinery in seconds
    "tiny": {**_QWEN2, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 151936, "tie_word_embeddings": True},
}
DEFAULT_MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen1.5-moe-16e", "qwen2.5-7b")
STAGES = ("load", "extract", "select", "search", "generate", "export_safetensors", "export_gguf_f16",
          "export_gguf_q8_0")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
BYTES = {"bfloat16": 2, "float32": 4}


def n_params(cfg: dict) -> int:
    """Parameters of the configuration as stored (a tied unembedding counted once)."""
    d, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    head = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    attn = d * d + 2 * d * kv + d * d + d + 2 * kv  # q, k, v (with biases), o
    if cfg["model_type"] == "qwen2_moe":
        e, inter, shared = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
        mlp = 3 * e * d * inter + e * d + 3 * d * shared + d
    else:
        mlp = 3 * d * cfg["intermediate_size"]
    return layers * (attn + mlp + 2 * d) + d + v * d * (1 if cfg["tie_word_embeddings"] else 2)


# --- building a model ---------------------------------------------------------------------------------------
def build_model(config: dict, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random-weight bfloat16 model of ``config`` (one of :data:`CONFIGS`) to ``out`` (once; atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from refusal_atlas.core.io import TensorEntry, atomic_dir, stream_safetensors

    if (out / "config.json").is_file():
        return out
    values = dict(config)
    model_type = values.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **values)
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(cfg).state_dict()
    tied = cfg.tie_word_embeddings

    def values_of(key: str, shape: tuple[int, ...]):
        def make():
            g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, key)) * 7919 + len(key))
            if key.endswith("norm.weight"):
                return torch.ones(shape, dtype=torch.bfloat16)
            return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        return make

    entries = [TensorEntry(k, tuple(t.shape), torch.bfloat16, values_of(k, tuple(t.shape)))
               for k, t in shapes.items() if not (tied and k == "lm_head.weight")]
    with atomic_dir(out, force=True) as tmp:
        stream_safetensors(tmp / "model.safetensors", entries, metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643).save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).is_file():
                shutil.copy(tokenizer_dir / f, tmp / f)
    return out


def embedded_tokenizer_dir() -> Path:
    from refusal_atlas.model.embedded import ensure_embedded_model

    return Path(ensure_embedded_model())


# --- the machine's own rates ---------------------------------------------------------------------------------
def matmul_rate(d: int, inter: int, dtype, rows: int = 512, repeats: int = 5) -> float:
    """FLOP/s of a [rows, d] × [d, inter] matmul (the model's MLP shape), median of ``repeats``.

    ``dtype``: a torch dtype or its name. bench/trial_cost.py uses it too, for its floor.
    """
    import torch

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    a, b = torch.randn(rows, d, dtype=dt), torch.randn(d, inter, dtype=dt)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * rows * d * inter / statistics.median(times)


def stream_rate(n: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read + written per second by a copy of ``n`` bytes (median of ``repeats``)."""
    import torch

    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times)


# --- the child: one stage ------------------------------------------------------------------------------------
class FlopCounter:
    """Matmul FLOPs and decoder-layer calls as they run: every nn.Linear's rows, the fused experts' routed rows."""

    def __init__(self, model):
        import torch

        self.flops = 0.0
        self.handles = []
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                self.handles.append(module.register_forward_pre_hook(self._linear))
            elif hasattr(module, "gate_up_proj") and getattr(module, "down_proj", None) is not None \
                    and getattr(module.down_proj, "ndim", 0) == 3:
                self.handles.append(module.register_forward_pre_hook(self._experts))

    def _linear(self, module, args):
        x = args[0]
        self.flops += 2.0 * x.numel() / x.shape[-1] * module.in_features * module.out_features

    def _experts(self, module, args):
        hidden, top_k_index = args[0], args[1]
        d, inter = module.down_proj.shape[1], module.down_proj.shape[2]
        self.flops += 2.0 * hidden.shape[0] * top_k_index.shape[-1] * 3 * d * inter

    def close(self):
        for h in self.handles:
            h.remove()


def _run_settings(a) -> dict:
    return {"model": str(a.model_dir), "device": "cpu", "dtype": a.dtype, "n_train": a.n_train, "filter_train": False,
            "harmful_val": "jailbreakbench", "harmless_val": "harmless_val", "n_val": a.n_val}


def child(a) -> dict:
    """Run stage ``a.stage`` in this process → what it measured (times exclude the model load).

    Also the two set-up steps, in children of their own so the parent never imports torch: a child's
    ``ru_maxrss`` starts from its parent's resident size at fork, so the parent must stay small.
    """
    if a.stage == "build":
        t = time.perf_counter()
        tokenizer_dir = Path(a.tokenizer) if a.tokenizer else embedded_tokenizer_dir()
        build_model(json.loads(Path(a.config_file).read_text(encoding="utf-8")), Path(a.model_dir), tokenizer_dir)
        return {"build_s": time.perf_counter() - t,
                "file_bytes": (Path(a.model_dir) / "model.safetensors").stat().st_size}
    if a.stage == "rates":
        cfg = json.loads(Path(a.config_file).read_text(encoding="utf-8"))
        inter = cfg["moe_intermediate_size"] if cfg["model_type"] == "qwen2_moe" else cfg["intermediate_size"]
        return {"matmul": matmul_rate(cfg["hidden_size"], inter, a.dtype), "stream": stream_rate(),
                "loadavg": os.getloadavg(), "machine": machine()}
    import torch

    import refusal_atlas.workflows.workspace as workspace
    from refusal_atlas.core import runtime

    runtime.configure(quiet=True)
    torch.manual_seed(0)
    info: dict = {"load_s": 0.0, "flops": 0.0}
    counters: list[FlopCounter] = []
    real_load = workspace.load_model

    def timed_load(*args, **kw):
        t = time.perf_counter()
        loaded = real_load(*args, **kw)
        info["load_s"] += time.perf_counter() - t
        counters.append(FlopCounter(loaded.model))
        return loaded

    workspace.load_model = timed_load
    run_dir, stage = Path(a.run_dir), a.stage
    t0 = time.perf_counter()
    import transformers  # noqa: F401  (imported before the clock starts, like any CLI start-up)

    if stage == "load":
        timed_load(str(a.model_dir), device="cpu", dtype=a.dtype)
        info["load_s"] = 0.0  # the stage *is* the load
    elif stage == "extract":
        from refusal_atlas.workflows import verbs

        _, acts = verbs.extract(run_dir, _run_settings(a))
        info["prompts"] = acts["harmful"].n + acts["harmless"].n
        verbs.dim(run_dir)
    elif stage == "select":
        from refusal_atlas.core.errors import ConfigError
        from refusal_atlas.workflows import verbs

        layer = int(a.n_layers * 0.4)  # inside the default candidate range floor(L/3) .. 0.8·L
        try:
            d = verbs.select(run_dir, {"layers": [layer], "positions": [-1]})
            info["selected"] = d.layer
        except ConfigError as exc:  # random weights: the one candidate may fail every filter
            info["select_error"] = str(exc)
            info["stage_s_scored"] = time.perf_counter() - t0 - info["load_s"]
            verbs.select(run_dir, {"layer": layer})  # the later stages need a direction: this one, unscored
    elif stage == "search":
        from refusal_atlas.workflows import verbs

        summary = verbs.search_edits(run_dir, {"n_val": a.n_val}, trials=1)
        info["trials"] = summary.get("n_trials", summary.get("trials"))
    elif stage == "generate":
        from refusal_atlas.data import load_prompts
        from refusal_atlas.model.generation import greedy_generate

        ws = workspace.reopen_workspace(run_dir)
        prompts = [p.instruction for p in load_prompts("jailbreakbench", n=a.n_gen, seed=0)]
        t_gen = time.perf_counter()
        gens = greedy_generate(ws.adapter, ws.chat, prompts, max_new_tokens=a.gen_tokens,
                               batch_size=ws.settings.evaluation.generation_batch_size)
        info["gen_s"] = time.perf_counter() - t_gen
        info["tokens"] = sum(len(g.token_ids) for g in gens)
        info["steps"] = max(len(g.token_ids) for g in gens)
    elif stage.startswith("export_"):
        import refusal_atlas.export.bundle as bundle
        import refusal_atlas.export.formats as formats
        import refusal_atlas.export.gguf as gguf
        from refusal_atlas.workflows.export import export

        for module, name, key in ((formats, "write_model_files", "write_s"), (gguf, "write_gguf", "write_s"),
                                  (bundle, "source_hashes", "hash_s"), (bundle, "hash_tree", "hash_s")):
            setattr(module, name, _timed(getattr(module, name), info, key))
        fmt, _, quant = stage.removeprefix("export_").partition("_")
        out = Path(a.export_dir)
        shutil.rmtree(out, ignore_errors=True)
        export(run_dir, out, format=fmt, quant=quant or None)
        info["bytes_written"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        shutil.rmtree(out, ignore_errors=True)
    info["stage_s"] = time.perf_counter() - t0 - info["load_s"]
    info["flops"] = sum(c.flops for c in counters)
    return info


def _timed(fn, info: dict, key: str):
    """``fn`` that adds its seconds to ``info[key]`` (where an export's time goes: writing vs hashing)."""
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            info[key] = info.get(key, 0.0) + time.perf_counter() - t
    return wrapper


# --- the parent ----------------------------------------------------------------------------------------------
def run_child(argv: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of ``python bench/scaling.py --child ...``."""
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=fh,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t, usage.ru_maxrss * 1024


def floor_of(stage: str, m: dict, info: dict, rates: dict) -> tuple[float | None, str]:
    """(floor seconds, what bounds it) of a finished stage (see the module docstring)."""
    weight_bytes = m["params"] * BYTES[m["dtype"]]
    if stage == "load":  # read the file once; converting to another dtype writes the weights once more
        return (m["file_bytes"] + (weight_bytes if m["dtype"] != "bfloat16" else 0)) / rates["stream"], "bytes"
    if stage.startswith("export_"):
        return (weight_bytes + info.get("bytes_written", 0)) / rates["stream"], "bytes"
    compute = info.get("flops", 0) / rates["matmul"]
    if stage == "generate":
        memory = info.get("steps", 0) * weight_bytes / rates["stream"]
        return max(compute, memory), "flops" if compute >= memory else "bytes"
    return (compute or None), "flops"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--dtypes", default="bfloat16,float32", help="float32 only where its weights fit --fp32-max-gb")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--work", default="bench_out/scaling")
    ap.add_argument("--out", default=None, help="folder for scaling.json and scaling.png (default: --work)")
    ap.add_argument("--tokenizer", default=None, help="folder with tokenizer.json etc. (default: the embedded model's)")
    ap.add_argument("--fp32-max-gb", type=float, default=14.0, help="skip float32 for models whose fp32 weights are larger")
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-gen", type=int, default=100)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="measure nothing: the table, JSON and plot of the stages already measured under --work")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.stage = a.child
        info = child(a)
        Path(a.result).write_text(json.dumps(info), encoding="utf-8")
        return
    bench(a)


def bench(a) -> dict:
    work = Path(a.work)
    out = Path(a.out) if a.out else work
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    stages = [s for s in a.stages.split(",") if s]
    for name in [m for m in a.models.split(",") if m]:
        cfg = CONFIGS[name]
        params = n_params(cfg)
        for dtype in [d for d in a.dtypes.split(",") if d]:
            if dtype == "float32" and params * 4 / 1e9 > a.fp32_max_gb:
                print(f"{name} {dtype}: skipped ({params * 4 / 1e9:.1f} GB of float32 weights > {a.fp32_max_gb} GB)")
                continue
            rows += bench_model(a, name, dtype, params, stages, work)
        if not a.keep_models:
            shutil.rmtree(work / "models" / name, ignore_errors=True)
    machines = [json.loads(p.read_text(encoding="utf-8"))["machine"] for p in sorted((work / "results").glob("*.rates.json"))]
    doc = {"machine": machines[-1] if machines else None, "settings": {k: getattr(a, k) for k in ("n_train", "n_val", "n_gen", "gen_tokens")},
           "configs": {n: CONFIGS[n] for n in {r["model"] for r in rows}}, "rows": rows}
    (out / "scaling.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(table(rows))
    plot(rows, out / "scaling.png")
    return doc


def _child_json(a, stage: str, argv: list[str], work: Path, log: Path) -> tuple[int, float, int, dict]:
    tmp = work / "tmp.json"
    tmp.unlink(missing_ok=True)
    common = ["--n-train", str(a.n_train), "--n-val", str(a.n_val), "--n-gen", str(a.n_gen),
              "--gen-tokens", str(a.gen_tokens)] + (["--tokenizer", a.tokenizer] if a.tokenizer else [])
    code, wall, rss = run_child(["--child", stage, "--result", str(tmp), *common, *argv], log)
    info = json.loads(tmp.read_text(encoding="utf-8")) if code == 0 and tmp.is_file() else {}
    if code != 0:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        info["error"] = next((l for l in reversed(lines) if l.startswith("error:") or "Error" in l),
                             lines[-1] if lines else f"exit {code}")
    return code, wall, rss, info


def bench_model(a, name: str, dtype: str, params: int, stages: list[str], work: Path) -> list[dict]:
    cfg = CONFIGS[name]
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    if getattr(a, "collect", False):  # a run stopped part-way still gives the rows it finished
        return [json.loads((results / f"{name}.{dtype}.{s}.json").read_text(encoding="utf-8")) for s in stages
                if (results / f"{name}.{dtype}.{s}.json").is_file()]
    todo = [s for s in stages if not (results / f"{name}.{dtype}.{s}.json").is_file()]
    model_dir = work / "models" / name
    rates_path = results / f"{name}.{dtype}.rates.json"
    config_file = work / "configs" / f"{name}.json"  # what the children build and measure
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    if todo:
        code, wall, _, info = _child_json(a, "build", ["--config-file", str(config_file), "--model-dir", str(model_dir)],
                                          work, work / f"{name}.build.log")
        if code:
            raise SystemExit(f"building {name} failed: {info.get('error')}")
        print(f"{name}: model at {model_dir} ({wall:.0f} s)", flush=True)
        code, _, _, rates = _child_json(a, "rates", ["--config-file", str(config_file), "--dtype", dtype], work,
                                        work / "rates.log")
        if code:
            raise SystemExit(f"measuring the rates failed: {rates.get('error')}")
        rates_path.write_text(json.dumps(rates), encoding="utf-8")
    rates = json.loads(rates_path.read_text(encoding="utf-8")) if rates_path.is_file() else None
    m = {"model": name, "dtype": dtype, "params": params, "model_type": cfg["model_type"],
         "file_bytes": (model_dir / "model.safetensors").stat().st_size if (model_dir / "model.safetensors").is_file()
         else params * 2}
    run_dir = work / "runs" / f"{name}.{dtype}"
    rows = []
    for stage in stages:
        done = results / f"{name}.{dtype}.{stage}.json"
        if not done.is_file():
            argv = ["--model-dir", str(model_dir), "--run-dir", str(run_dir), "--dtype", dtype,
                    "--export-dir", str(work / "export"), "--n-layers", str(cfg["num_hidden_layers"])]
            load = os.getloadavg()
            code, wall, rss, info = _child_json(a, stage, argv, work, work / f"{name}.{dtype}.{stage}.log")
            rec = {**m, "stage": stage, "exit": code, "wall_s": wall, "peak_rss_bytes": rss, **info,
                   "loadavg_before": load, "loadavg_after": os.getloadavg()}
            if code == 0 and rates:
                floor, bound = floor_of(stage, m, info, rates)
                rec.update(floor_s=floor, bound=bound, ratio=(info["stage_s"] / floor) if floor else None,
                           matmul_gflops=rates["matmul"] / 1e9, stream_gbs=rates["stream"] / 1e9)
            done.write_text(json.dumps(rec), encoding="utf-8")
            shutil.rmtree(work / "export", ignore_errors=True)
            print(row_text(rec), flush=True)
        rows.append(json.loads(done.read_text(encoding="utf-8")))
    return rows


def machine() -> dict:
    import platform

    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    mem = next((int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), None) if Path("/proc/meminfo").is_file() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "mem_total_bytes": mem,
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


HEADER = (f"{'model':<16} {'dtype':<8} {'params':>7} {'stage':<18} {'wall s':>8} {'stage s':>8} {'peak RSS':>9} "
          f"{'floor s':>8} {'ratio':>6}  bound")


def row_text(r: dict) -> str:
    if r.get("exit"):
        return (f"{r['model']:<16} {r['dtype']:<8} {r['params'] / 1e9:6.2f}B {r['stage']:<18} {r['wall_s']:8.1f} "
                f"{'-':>8} {r['peak_rss_bytes'] / 2**30:7.2f}G  {r.get('error', '')[:90]}")
    floor = f"{r['floor_s']:8.1f}" if r.get("floor_s") else f"{'-':>8}"
    ratio = f"{r['ratio']:6.1f}" if r.get("ratio") else f"{'-':>6}"
    return (f"{r['model']:<16} {r['dtype']:<8} {r['params'] / 1e9:6.2f}B {r['stage']:<18} {r['wall_s']:8.1f} "
            f"{r['stage_s']:8.1f} {r['peak_rss_bytes'] / 2**30:7.2f}G {floor} {ratio}  {r.get('bound', '')}")


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER, "-" * len(HEADER), *(row_text(r) for r in rows)])


def plot(rows: list[dict], path: Path) -> None:
    """Stage time and peak RSS against parameter count, log-log, one line per (stage, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    # one colour per stage, one line style per dtype: 8 stages × 2 dtypes would reuse a 10-colour cycle
    colours = {stage: plt.get_cmap("tab10")(i) for i, stage in enumerate(STAGES)}
    styles = {"bfloat16": "-", "float32": "--"}
    for (stage, dtype) in sorted({(r["stage"], r["dtype"]) for r in rows}):
        pts = sorted((r["params"], r["stage_s"], r["peak_rss_bytes"], r["model_type"]) for r in rows
                     if r["stage"] == stage and r["dtype"] == dtype and not r.get("exit") and r.get("stage_s"))
        if not pts:
            continue
        style, colour = styles.get(dtype, ":"), colours.get(stage, "black")
        dense = [p for p in pts if p[3] != "qwen2_moe"]
        axes[0].plot([p[0] for p in dense], [p[1] for p in dense], style, marker="o", color=colour)
        axes[1].plot([p[0] for p in dense], [p[2] / 2**30 for p in dense], style, marker="o", color=colour)
        for p in pts:
            if p[3] == "qwen2_moe":  # the MoE: a marker of its own, not on the dense line
                axes[0].plot([p[0]], [p[1]], marker="*", markersize=12, color=colour)
                axes[1].plot([p[0]], [p[2] / 2**30], marker="*", markersize=12, color=colour)
    present = {(r["stage"], r["dtype"]) for r in rows}
    handles = [Line2D([], [], color=colours[s], marker="o", label=s) for s in STAGES if any(k[0] == s for k in present)]
    handles += [Line2D([], [], color="grey", linestyle=styles[d], label=d) for d in styles if any(k[1] == d for k in present)]
    for ax, label in ((axes[0], "stage time (s, model load excluded)"), (axes[1], "peak RSS of the stage's process (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (★: the MoE, 5.2B stored)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(20, color="red", alpha=0.4, linestyle=":")
    axes[0].legend(handles=handles, fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
