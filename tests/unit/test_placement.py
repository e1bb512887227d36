"""Device maps, CPU/disk offload and dtype fallback: same logits, same hooks, same export as one device."""

import json

import pytest
import torch
from safetensors.torch import load_file

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.model.placement import is_offloaded, parse_device_map, parse_max_memory
from tiny import TinyLoaded

SPLIT = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "disk"}


def _export(loaded, directions, out) -> None:
    """The orthogonalized model written as a standalone HF directory."""
    DirectionalAblation(directions).apply_weights(loaded.model)
    save_model_dir(loaded.model, loaded.tokenizer, out)


def _logits(loaded, prompts, directions=None):
    adapter, chat = ModelAdapter(loaded.model), ChatFormatter(loaded.tokenizer)
    batch = chat.encode(prompts, device=adapter.device)
    if directions is None:
        return loaded.model(**batch).logits
    with ablate(adapter, directions):
        return loaded.model(**batch).logits


def test_split_device_map_matches_single_device(tiny_model_dir, prompts, tmp_path):
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(SPLIT))
    single = load_model(str(tiny_model_dir), device="cpu")
    split = load_model(str(tiny_model_dir), device="cpu", device_map=str(map_file))
    assert is_offloaded(split.model) and not is_offloaded(single.model)
    assert split.model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # really offloaded
    assert split.info["modules_per_device"] == {"disk": 4, "cpu": 4}
    assert ModelAdapter(split.model).device == torch.device("cpu")  # the execution device, not meta
    dirs = torch.randn(2, ModelAdapter(single.model).d_model, generator=torch.Generator().manual_seed(0))
    base = _logits(single, prompts)
    assert torch.equal(_logits(split, prompts), base)
    hooked = _logits(single, prompts, dirs)
    assert torch.equal(_logits(split, prompts, dirs), hooked)
    assert not torch.allclose(hooked, base, atol=1e-3)
    # weight export from the split model equals export from the single-device one
    _export(single, dirs, tmp_path / "single")
    _export(split, dirs, tmp_path / "split")
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the edit reached the offloaded weights (read at forward time), so the split model now equals hook ablation
    assert torch.allclose(_logits(split, prompts), hooked, atol=1e-4)


def test_hand_built_cpu_offload_and_disk_dispatch(prompts, tmp_path):
    """accelerate's cpu_offload (weights in RAM, meta placeholders) on some blocks, disk on others."""
    from accelerate import cpu_offload, dispatch_model

    ref, t = TinyLoaded("llama"), TinyLoaded("llama")
    dirs = torch.randn(ModelAdapter(ref.model).d_model, generator=torch.Generator().manual_seed(1))
    base, hooked = _logits(ref, prompts), _logits(ref, prompts, dirs)
    dispatch_model(t.model, {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                             "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "cpu",
                             "model.norm": "cpu", "lm_head": "cpu"}, offload_dir=tmp_path / "offload")
    cpu_offload(t.model.model.layers[2], execution_device="cpu")
    cpu_offload(t.model.model.embed_tokens, execution_device="cpu")
    assert t.model.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    assert torch.equal(_logits(t, prompts), base)
    assert torch.equal(_logits(t, prompts, dirs), hooked)
    _export(ref, dirs, tmp_path / "ref")
    _export(t, dirs, tmp_path / "offloaded")
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "offloaded" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_weight_edit_and_hooks_remove_the_direction():
    """bf16 model: orthogonalized weights lose the direction up to one bf16 rounding; hooks remove it too."""
    t = TinyLoaded("qwen2")
    t.model.to(torch.bfloat16)
    adapter = ModelAdapter(t.model)
    u = torch.nn.functional.normalize(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(2)), dim=0)
    emb_before = adapter.embedding.weight.float().clone()
    # a hooked forward: every block input's component along u is what bf16 rounding of the output leaves
    seen = []
    chat = ChatFormatter(t.tokenizer)
    batch = chat.encode(["how to make a bomb", "tell joke"])
    with ablate(adapter, u):  # capture hooks registered after the ablation's, so they see its output
        hooks = [layer.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).float()), with_kwargs=True)
            for layer in adapter.layers]
        t.model(**batch)
    for h in hooks:
        h.remove()
    assert len(seen) == adapter.n_layers
    for x in seen:  # tolerance: bf16 relative precision 2^-8 per element, summed over d in quadrature
        assert (x @ u).abs().max() <= x.abs().max() * 2 ** -8 * adapter.d_model ** 0.5
    DirectionalAblation(u).apply_weights(t.model)
    for w, cols in [(adapter.embedding.weight, False), (adapter.attn_out_proj(1).weight, True),
                    (adapter.mlp_out_proj(3).weight, True)]:
        assert w.dtype == torch.bfloat16
        comp = (u @ w.float()) if cols else (w.float() @ u)
        bound = w.float().abs().max() * 2 ** -8 * adapter.d_model ** 0.5
        assert comp.abs().max() <= bound
    # float32-then-rounded: each edited element is the bf16 rounding of the float32 projection
    exact = emb_before - (emb_before @ u).unsqueeze(-1) * u
    assert torch.equal(adapter.embedding.weight, exact.to(torch.bfloat16))


def test_non_finite_dtype_falls_back_to_float32(tmp_path, prompts):
    t = TinyLoaded("qwen2")
    with torch.no_grad():
        t.model.model.embed_tokens.weight.mul_(1e8)  # beyond float16's range (65504): inf in half precision
    save_model_dir(t.model, t.tokenizer, tmp_path / "big")
    loaded = load_model(str(tmp_path / "big"), device="cpu", dtype="float16")
    assert loaded.info["dtype"] == "float32"
    assert loaded.info["dtype_fallback"]["requested"] == "float16"
    assert torch.isfinite(_logits(loaded, prompts)).all()
    with pytest.raises(ModelError, match="non-finite"):
        load_model(str(tmp_path / "big"), device="cpu", dtype="float16", dtype_fallback=False)
    kept = load_model(str(tmp_path / "big"), device="cpu", dtype="bfloat16")  # bf16 has float32's range
    assert kept.info["dtype"] == "bfloat16" and "dtype_fallback" not in kept.info


def test_placement_options_parse_and_reject(tmp_path):
    assert parse_device_map("balanced_low_0") == "balanced_low_0"
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    f = tmp_path / "m.json"
    f.write_text('{"model.layers.0": 0, "lm_head": "cpu"}')
    assert parse_device_map(str(f)) == {"model.layers.0": 0, "lm_head": "cpu"}
    for bad in ("everywhere", str(tmp_path / "missing.json")):
        with pytest.raises(ConfigError, match="--device-map"):
            parse_device_map(bad)
    with pytest.raises(ConfigError, match="entry 0='lots'"):
        parse_max_memory("0=lots")
    with pytest.raises(ConfigError, match="unknown device"):
        parse_max_memory("gpu0=2GiB")
    with pytest.raises(ModelError, match="needs --device-map"):
        load_model("/nonexistent-but-never-reached", device="cpu", max_memory="cpu=1GiB")
