"""A model folder we write must not claim GGUF quantization: its weights are plain de-quantized tensors.

transformers leaves ``quantization_config = {"quant_method": "gguf", ...}`` on a model loaded from a GGUF file
(the embedded model is). Written into config.json, that told every later reader the folder was quantized, and
transformers then refused to ``save_pretrained`` any model loaded from it (heretic's save of a trial failed so).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import refusal_atlas.model.embedded as embedded
from refusal_atlas.model.saving import drop_gguf_quantization, is_gguf_quantization, save_model_dir
from tiny import TinyLoaded

GGUF_QUANT = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}


def _gguf_loaded_tiny():
    t = TinyLoaded("qwen2")
    t.model.config.quantization_config = dict(GGUF_QUANT)  # what GGUF loading leaves on the config
    return t


def _logits(model):
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        return model(ids).logits


def test_written_config_drops_gguf_quantization_and_the_folder_loads_and_saves(tmp_path):
    t = _gguf_loaded_tiny()
    out = save_model_dir(t.model, t.tokenizer, tmp_path / "m")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert t.model.config.quantization_config == GGUF_QUANT  # the loaded model's own config is not touched
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(loaded), _logits(t.model), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "resaved")  # what heretic does with each trial's model
    assert (tmp_path / "resaved" / "config.json").is_file()


def test_a_folder_that_keeps_the_gguf_config_cannot_be_resaved(tmp_path):
    """The control: the failure the fix removes is real with the installed transformers."""
    t = _gguf_loaded_tiny()
    out = save_model_dir(t.model, t.tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": GGUF_QUANT}))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(Exception, match="gguf"):
        loaded.save_pretrained(tmp_path / "resaved")
    assert drop_gguf_quantization(out / "config.json") is True
    assert drop_gguf_quantization(out / "config.json") is False  # already plain: nothing rewritten
    assert json.loads((out / "config.json").read_text()) == config  # every other key kept
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "resaved")


def test_other_quantization_configs_are_kept():
    assert is_gguf_quantization(GGUF_QUANT)
    assert not is_gguf_quantization({"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert not is_gguf_quantization(None)


def test_an_embedded_cache_built_before_the_fix_is_repaired_on_use(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "COMPLETE").write_text("sha\n")
    (cache / "config.json").write_text(json.dumps({"model_type": "qwen2", "quantization_config": GGUF_QUANT}))
    monkeypatch.setattr(embedded, "embedded_cache_dir", lambda: cache)
    assert embedded.ensure_embedded_model() == cache
    assert json.loads((cache / "config.json").read_text()) == {"model_type": "qwen2"}
