"""Export formats on tiny random models: LoRA merge = weight edit = hooks, GGUF round trip, original dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.export.formats import export_model
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.export.gguf import write_gguf
from refusal_atlas.export.lora import snapshot, write_lora
from tiny import TinyLoaded, tiny_bpe_tokenizer, tiny_model

PROMPTS = ["how to make a bomb", "write poem about cats please", "tell joke", "hack into computer"]


def _hooked(model, tokenizer, dirs):
    batch = ChatFormatter(tokenizer).encode(PROMPTS)
    with ablate(ModelAdapter(model), dirs):
        return batch, model(**batch).logits


@pytest.mark.parametrize("arch,tie,k", [("qwen2", False, 2), ("llama", True, 3)])
def test_lora_merged_on_the_original_equals_hook_ablation(arch, tie, k, tmp_path):
    from peft import PeftModel

    tiny = TinyLoaded(arch, tie=tie)
    dirs = torch.randn(k, tiny.model.config.hidden_size)
    batch, hooked = _hooked(tiny.model, tiny.tokenizer, dirs)
    before = snapshot(tiny.model)
    DirectionalAblation(dirs).apply_weights(tiny.model)
    summary = write_lora(before, tiny.model, tmp_path, base_model="tiny")
    assert summary["rank"] == k  # plain ablation of k directions: rank k on every edited matrix
    assert summary["modules"] == 1 + 2 * tiny.model.config.num_hidden_layers  # embedding, o_proj, down_proj
    assert summary["untied_lm_head"] == tie and summary["max_relative_error"] < 1e-5
    base = TinyLoaded(arch, tie=tie).model  # a fresh copy of the original weights
    peft_model = PeftModel.from_pretrained(base, tmp_path)
    assert torch.allclose(peft_model(**batch).logits, hooked, atol=1e-4)  # unmerged adapter
    merged = peft_model.merge_and_unload()
    assert torch.allclose(merged(**batch).logits, hooked, atol=1e-4)
    clean = TinyLoaded(arch, tie=tie).model(**batch).logits
    assert not torch.allclose(clean, hooked, atol=1e-3)
    if tie:  # the unembedding is the original one, not the edited embedding
        assert torch.equal(merged.lm_head.weight, before.state["lm_head.weight"])


def test_lora_truncation_reports_its_error(tmp_path):
    tiny = TinyLoaded("qwen2")
    before = snapshot(tiny.model)
    with torch.no_grad():  # a full-rank change (like norm-preserving rescaling) cut to rank 1
        tiny.model.model.layers[0].mlp.down_proj.weight.mul_(1.1)
    summary = write_lora(before, tiny.model, tmp_path, base_model="tiny", max_rank=1)
    assert summary["rank"] == 1 and summary["max_relative_error"] > 0.1


def test_lora_refuses_edits_it_cannot_carry(tmp_path):
    tiny = TinyLoaded("qwen2")
    before = snapshot(tiny.model)
    with pytest.raises(ModelError, match="changed no weights"):
        write_lora(before, tiny.model, tmp_path, base_model="tiny")
    with torch.no_grad():
        tiny.model.model.norm.weight.add_(1.0)
    with pytest.raises(ModelError, match="only Linear and Embedding"):
        write_lora(before, tiny.model, tmp_path, base_model="tiny")


def _bpe_model(arch, seed=0):
    tok = tiny_bpe_tokenizer()
    return tiny_model(arch, vocab_size=len(tok) + 5, seed=seed), tok  # 5 padding rows beyond the vocabulary


@pytest.mark.parametrize("arch,quant,tol", [("qwen2", "f32", 1e-5), ("qwen2", "f16", 2e-3), ("qwen2", "q8_0", 2e-2),
                                            ("qwen2", "q4_0", 0.3), ("llama", "f32", 1e-5), ("llama", "q8_0", 2e-2),
                                            ("mistral", "bf16", 2e-2)])
def test_gguf_round_trip_through_transformers(arch, quant, tol, tmp_path):
    model, tok = _bpe_model(arch)
    dirs = torch.randn(2, model.config.hidden_size)
    batch, hooked = _hooked(model, tok, dirs)
    DirectionalAblation(dirs).apply_weights(model)
    edited = model(**batch).logits
    write_gguf(model, tok, tmp_path / "m.gguf", quant)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert back.config.model_type == ("llama" if arch == "mistral" else arch)  # llama.cpp runs Mistral as llama
    err = (back(**batch).logits - edited).abs().max().item()
    assert err < tol, err
    assert torch.allclose(edited, hooked, atol=1e-4)
    if quant == "f32":
        assert err < 1e-5  # llama's rotary permutation undone exactly
    # tokenizer, special tokens and chat template are carried over
    tok_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    messages = [{"role": "user", "content": "how to make a bomb"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok_back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert tok_back(text).input_ids == tok(text).input_ids
    assert tok_back.eos_token == "<eos>"


def test_gguf_quantization_is_measurably_lossy(tmp_path):
    model, tok = _bpe_model("qwen2")
    errs = {}
    for quant in ("f16", "q8_0", "q4_0"):
        write_gguf(model, tok, tmp_path / f"{quant}.gguf", quant)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{quant}.gguf", dtype=torch.float32)
        w = back.model.layers[0].mlp.down_proj.weight
        errs[quant] = (w - model.model.layers[0].mlp.down_proj.weight).abs().max().item()
    assert 0 < errs["f16"] < errs["q8_0"] < errs["q4_0"]


def test_gguf_rejects_what_it_cannot_write(tmp_path):
    model, tok = _bpe_model("qwen2")
    with pytest.raises(ConfigError, match="unknown GGUF quantization 'q3_k'"):
        write_gguf(model, tok, tmp_path / "m.gguf", "q3_k")
    tiny = TinyLoaded("qwen2")  # WordLevel tokenizer
    with pytest.raises(ModelError, match="byte-level BPE"):
        write_gguf(tiny.model, tiny.tokenizer, tmp_path / "m.gguf", "f16")
    with pytest.raises(ConfigError, match="GGUF export supports .*qwen2"):
        write_gguf(TinyLoaded("gemma2").model, tok, tmp_path / "m.gguf", "f16")


def test_safetensors_export_keeps_the_source_dtype(tmp_path):
    from safetensors import safe_open

    from refusal_atlas.model import load_model

    tiny = TinyLoaded("qwen2")
    save_model_dir(tiny.model, tiny.tokenizer, tmp_path / "src", dtype=torch.bfloat16)
    loaded = load_model(str(tmp_path / "src"), device="cpu")  # loaded in float32 on CPU
    assert loaded.model.dtype == torch.float32
    summary = export_model(loaded, DirectionalAblation(torch.randn(1, 32)).apply_weights, tmp_path / "out")
    assert summary["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    loaded = load_model(str(tmp_path / "src"), device="cpu")
    assert export_model(loaded, DirectionalAblation(torch.randn(1, 32)).apply_weights, tmp_path / "out32",
                        dtype="float32")["dtype"] == "float32"
