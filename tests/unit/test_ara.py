"""Training the ARA-style low-rank edit on a tiny run: the verb end to end (edit, adapter, evaluate, export), the
losses doing what they say, seeded determinism, and kill -9 mid-training resuming to the same bits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import load_tensors
from refusal_atlas.directions.ara import AraConfig, AraData, FactorLayout, ara_loss, default_layers
from refusal_atlas.edits import LowRankEdit, load_edit
from refusal_atlas.model import ChatFormatter, ModelAdapter
from test_crash_resume import cli, killed_cli, work
from tiny import TinyLoaded

FAST = ("--n-train", "8", "--n-val", "4", "--retain-tokens", "3", "--rank", "2", "--batch-size", "4",
        "--micro-batch", "2", "--eval-every", "2", "--lr", "0.003")


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    root, _, _ = tiny_run
    return shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("edits", "checkpoints", "ara_*"))


def test_config_resolves_the_default_band_and_checks_shapes():
    assert default_layers(24) == list(range(8, 19)) and default_layers(4) == [1, 2]
    cfg = AraConfig().resolve(24, 896)
    assert cfg.layers == tuple(range(8, 19)) and cfg.target_layer == 19 and cfg.components == ("attn", "mlp")
    assert AraConfig(layers=(5, 3, 3), components=("mlp",)).resolve(24, 896).targets() == [(3, "mlp"), (5, "mlp")]
    for bad, match in [(AraConfig(rank=897), "rank must be in 1..d_model = 896"), (AraConfig(layers=(24,)), "unknown"),
                       (AraConfig(layers=(23,)), "target layer"), (AraConfig(components=()), "components")]:
        with pytest.raises(ConfigError, match=match):
            bad.resolve(24, 896)


def test_losses_start_at_one_and_zero_and_the_shift_is_zero_exactly_at_its_target(prompts):
    from refusal_atlas.edits.actadd import add_activation

    tiny = TinyLoaded("qwen2")
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    harmful, harmless = prompts[:3] + ["how to make a bomb please"], prompts[3:] + ["tell joke please"]
    cfg = AraConfig(rank=2, layers=(1,), target_layer=2).resolve(4, 32)
    data = AraData(adapter, chat, harmful, harmless, [[5, 6, 7], [8], [9, 10], [11, 4]], 2, batch_size=2)
    assert [len(e.target_ids) for e in data.retain] == [3, 1, 2, 2]  # ids kept as given, no text round trip
    layout = FactorLayout(adapter, cfg.targets(), cfg.rank)
    start = layout.start(seed=0)
    assert torch.equal(start, layout.start(seed=0)) and not torch.equal(start, layout.start(seed=1))
    flat = start.clone().requires_grad_(True)
    loss, parts = ara_loss(adapter, data, layout.split(flat), [0, 1, 2, 3], cfg)
    assert parts["shift"] == pytest.approx(1.0, abs=1e-4)  # B = 0: the unedited model, one gap away
    assert parts["retain"] == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    grads = layout.split(flat.grad)
    assert all(g_b.abs().sum() > 0 and torch.equal(g_a, torch.zeros_like(g_a)) for g_a, g_b in grads.values())
    # every harmful residual moved by exactly the mean gap is the target: the loss is 0 there
    with add_activation(adapter, data.gap, data.target_layer):
        assert float(data.shift_loss(adapter, [0, 1, 2, 3])) == pytest.approx(0.0, abs=1e-6)
    with add_activation(adapter, 2 * data.gap, data.target_layer):  # twice the gap: one gap too far
        assert float(data.shift_loss(adapter, [0, 1, 2, 3])) == pytest.approx(1.0, abs=1e-4)
    # an edit (B != 0) moves the harmless continuations' distribution: the retain KL is positive and has a gradient
    moved = start.clone()
    for target, (a, b) in layout.split(moved).items():
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(target[0])))
    moved.requires_grad_(True)
    loss, parts = ara_loss(adapter, data, layout.split(moved), [0, 1, 2, 3], cfg)
    assert parts["retain"] > 1e-4 and parts["shift"] != pytest.approx(1.0, abs=1e-3)
    loss.backward()
    assert all(g_a.abs().sum() > 0 and g_b.abs().sum() > 0 for g_a, g_b in layout.split(moved.grad).values())


def test_train_edit_ara_verb_end_to_end(tiny_run, run_copy, tmp_path):
    from peft import PeftModel

    _, ws, _ = tiny_run

    cli("train-edit", "ara", "-r", str(run_copy), *FAST, "--steps", "6", "--adapter", str(tmp_path / "adapter"))
    edit = load_edit(run_copy / "edits" / "ara")
    assert isinstance(edit, LowRankEdit) and edit.rank == 2
    assert edit.targets == [(1, "attn"), (1, "mlp"), (2, "attn"), (2, "mlp")]
    meta = edit.meta
    assert meta["ara"]["target_layer"] == 3 and meta["train"]["steps"] == 6 and len(meta["history"]["loss"]) == 6
    assert meta["history"]["shift"][-1] < meta["history"]["shift"][0]  # the harmful residuals moved toward the target
    retain = json.loads((run_copy / "ara_retain.json").read_text())
    assert len(retain["retain_ids"]) == meta["n_retain"] and all(len(ids) == 3 for ids in retain["retain_ids"])
    assert meta["history"]["retain"][0] == pytest.approx(0.0, abs=1e-7) and max(meta["history"]["retain"]) > 0
    assert [v["step"] for v in meta["val_history"]] == [0, 2, 4, 6]
    assert meta["val_history"][0]["kl"] == pytest.approx(0.0, abs=1e-7)  # step 0: the unedited model
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["trained_edits"]["ara"]["rank"] == 2 and "train_edit_ara" in manifest["timings_s"]
    # the adapter: A and B as trained, PEFT applies them
    tensors, _ = load_tensors(tmp_path / "adapter" / "adapter_model.safetensors")
    a, b = edit.factors[(2, "mlp")]
    assert torch.equal(tensors["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"], a)
    assert torch.equal(tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"], b)
    assert load_edit(tmp_path / "adapter" / "reproduce" / "edit_spec").fingerprint() == edit.fingerprint()
    model_dir = json.loads((run_copy / "manifest.json").read_text())["config"]["model"]["model"]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = ws.chat.encode(["how to make a bomb", "tell joke"])
    with edit.hooks(base):
        expected = base(**batch).logits
    assert torch.allclose(PeftModel.from_pretrained(base, tmp_path / "adapter")(**batch).logits, expected, atol=1e-4)
    # evaluate and export use it like any saved edit
    cli("evaluate", "-r", str(run_copy), "--edit", "ara", "--interventions", "none", "--datasets", "harmless_test",
        "--n", "3", "--max-new-tokens", "2", "--kl-tokens", "2")
    rows = [r for r in json.loads((run_copy / "metrics.json").read_text()) if r.get("edit") == "lowrank"]
    assert rows and all(r["fingerprint"] == edit.fingerprint() for r in rows)
    cli("export", "-r", str(run_copy), "--edit", "ara", "--out", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
    # rerunning the finished job recomputes nothing and changes nothing
    before = (run_copy / "edits" / "ara.safetensors").read_bytes()
    log = tmp_path / "work.log"
    cli("train-edit", "ara", "-r", str(run_copy), *FAST, "--steps", "6", log=log)
    assert work(log, "train") == 0 and (run_copy / "edits" / "ara.safetensors").read_bytes() == before


def test_train_edit_ara_killed_mid_training_resumes_bit_identically(tiny_run, tmp_path):
    root, _, _ = tiny_run
    straight, crashed = (shutil.copytree(root / "run", tmp_path / n, ignore=shutil.ignore_patterns("edits", "ara_*"))
                         for n in ("straight", "killed"))
    args = (*FAST, "--steps", "5")
    cli("train-edit", "ara", "-r", str(straight), *args)
    log = tmp_path / "work.log"
    killed_cli("train-edit", "ara", "-r", str(crashed), *args, kill="train:3", log=log)
    assert work(log, "train") == 3 and not (crashed / "edits" / "ara.json").exists()
    assert (crashed / "checkpoints" / "ara" / "run1.safetensors").is_file()
    log.unlink()
    cli("train-edit", "ara", "-r", str(crashed), *args, log=log)
    assert work(log, "train") == 2  # only the steps the killed run had not finished
    (ta, ma), (tb, mb) = (load_tensors(r / "edits" / "ara.safetensors") for r in (straight, crashed))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    a, b = (json.loads((r / "edits" / "ara.json").read_text()) for r in (straight, crashed))
    assert a["fingerprint"] == b["fingerprint"]
    assert a["spec"]["meta"]["history"] == b["spec"]["meta"]["history"]
    assert a["spec"]["meta"]["val_history"] == b["spec"]["meta"]["val_history"]
