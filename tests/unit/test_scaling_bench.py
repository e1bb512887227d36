"""bench/scaling.py: the configurations, the FLOP count, the floors, and the whole bench on a tiny model.

The tiny run goes through the real machinery (a model built and streamed to disk, every stage in a child
process read back with wait4, results resumable per stage) in a minute or two.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"
_spec = importlib.util.spec_from_file_location("scaling", _PATH)
sc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sc)


@pytest.mark.parametrize("name", sorted(sc.CONFIGS))
def test_parameter_count_matches_the_model_transformers_builds(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(sc.CONFIGS[name])
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    stored = sum(t.numel() for k, t in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    assert sc.n_params(sc.CONFIGS[name]) == stored


def test_published_sizes():
    """The configurations give the parameter counts Qwen publishes (0.49B, 1.54B, 3.09B, 7.62B)."""
    sizes = {n: round(sc.n_params(sc.CONFIGS[n]) / 1e9, 2) for n in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b",
                                                                      "qwen2.5-7b")}
    assert sizes == {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62}


def test_flop_counter_counts_linear_rows_and_routed_experts():
    from tiny import PROMPTS_MOE, tiny_model, tiny_moe_model, tiny_tokenizer

    model = tiny_model("qwen2")
    counter = sc.FlopCounter(model)
    x = torch.randint(0, 10, (3, 5))
    model(input_ids=x, logits_to_keep=1)
    cfg = model.config
    per_token = sum(m.in_features * m.out_features for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert counter.flops == 2 * 15 * per_token + 2 * 3 * cfg.hidden_size * cfg.vocab_size  # head: last row only
    counter.close()
    model(input_ids=x)
    assert counter.flops == 2 * 15 * per_token + 2 * 3 * cfg.hidden_size * cfg.vocab_size  # hooks removed

    # a mixture of experts: the fused experts count their routed rows, top-k per token, three matrices each
    moe = tiny_moe_model("qwen2_moe")
    experts = [m for m in moe.modules() if hasattr(m, "gate_up_proj")]
    counter = sc.FlopCounter(moe)
    ids = tiny_tokenizer()(PROMPTS_MOE[:1], return_tensors="pt")["input_ids"]
    moe(input_ids=ids, logits_to_keep=1)
    linear = sum(m.in_features * m.out_features for n, m in moe.named_modules()  # routers, shared experts included
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    e = experts[0]
    routed = 2 * ids.shape[1] * moe.config.num_experts_per_tok * 3 * e.down_proj.shape[1] * e.down_proj.shape[2]
    head = 2 * moe.config.hidden_size * moe.config.vocab_size
    assert len(experts) == 3  # layer 1 is dense
    assert counter.flops == 2 * ids.shape[1] * linear + len(experts) * routed + head


def test_floors():
    rates = {"matmul": 1e11, "stream": 1e10}
    m = {"params": 10**9, "dtype": "bfloat16", "file_bytes": 2 * 10**9}
    assert sc.floor_of("load", m, {}, rates) == (0.2, "bytes")  # the file read once, no conversion
    assert sc.floor_of("load", {**m, "dtype": "float32"}, {}, rates) == (0.6, "bytes")  # + float32 weights written
    assert sc.floor_of("export_gguf_q8_0", m, {"bytes_written": 10**9}, rates) == (0.3, "bytes")
    assert sc.floor_of("extract", m, {"flops": 5e11}, rates) == (5.0, "flops")
    # decoding: whichever is slower, the matmuls or reading every weight once per step
    assert sc.floor_of("generate", m, {"flops": 1e11, "steps": 64}, rates) == (64 * 2e9 / 1e10, "bytes")
    assert sc.floor_of("generate", m, {"flops": 1e13, "steps": 64}, rates) == (100.0, "flops")


def test_the_bench_on_a_tiny_model_is_measured_in_children_and_resumes(tmp_path):
    from tiny import tiny_bpe_tokenizer

    tok_dir = tmp_path / "tok"
    tok = tiny_bpe_tokenizer()
    tok.save_pretrained(tok_dir)
    vocab = len(tok) + 5
    sc.CONFIGS["tiny-test"] = {**sc.CONFIGS["tiny"], "vocab_size": vocab, "bos_token_id": 4, "eos_token_id": 4}
    try:
        args = SimpleNamespace(models="tiny-test", dtypes="bfloat16", stages="load,extract,select,export_safetensors",
                               work=str(tmp_path / "work"), out=str(tmp_path / "out"), tokenizer=str(tok_dir),
                               fp32_max_gb=14.0, n_train=4, n_val=4, n_gen=2, gen_tokens=2, keep_models=False)
        doc = sc.bench(args)
    finally:
        del sc.CONFIGS["tiny-test"]
    rows = {r["stage"]: r for r in doc["rows"]}
    assert set(rows) == {"load", "extract", "select", "export_safetensors"}
    for stage, r in rows.items():
        assert r["exit"] == 0, (stage, r.get("error"))
        assert 0 < r["peak_rss_bytes"] < 8 * 2**30 and r["wall_s"] >= r["stage_s"] > 0
        assert r["floor_s"] > 0 and r["ratio"] == pytest.approx(r["stage_s"] / r["floor_s"])
    assert rows["extract"]["flops"] > 0 and rows["extract"]["prompts"] == 8
    assert rows["export_safetensors"]["bytes_written"] > 0 and "hash_s" in rows["export_safetensors"]
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())["rows"] == doc["rows"]
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
    assert not (tmp_path / "work" / "models" / "tiny-test").exists()  # deleted after its stages
    results = sorted((tmp_path / "work" / "results").glob("tiny-test.*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    sc.CONFIGS["tiny-test"] = {**sc.CONFIGS["tiny"], "vocab_size": vocab, "bos_token_id": 4, "eos_token_id": 4}
    try:
        again = sc.bench(args)  # resumable: every stage is already done, nothing reruns or rebuilds
    finally:
        del sc.CONFIGS["tiny-test"]
    assert again["rows"] == doc["rows"] and {p: p.stat().st_mtime_ns for p in results} == stamps
    assert not (tmp_path / "work" / "models" / "tiny-test").exists()

    # --collect: the finished stages only, nothing measured or built (here "generate" was never run)
    args.stages, args.collect = "load,extract,select,generate,export_safetensors", True
    sc.CONFIGS["tiny-test"] = {**sc.CONFIGS["tiny"], "vocab_size": vocab, "bos_token_id": 4, "eos_token_id": 4}
    try:
        collected = sc.bench(args)
    finally:
        del sc.CONFIGS["tiny-test"]
    assert collected["rows"] == doc["rows"] and {p: p.stat().st_mtime_ns for p in results} == stamps
    assert not (tmp_path / "work" / "models" / "tiny-test").exists()
    assert not (tmp_path / "work" / "results" / "tiny-test.bfloat16.generate.json").exists()
