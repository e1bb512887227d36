"""Memory and disk before a job starts: sizes, the model's shape from its files, the estimate and the check."""

from __future__ import annotations

import logging

import pytest
import torch

from refusal_atlas.core import runtime
from refusal_atlas.core.errors import ConfigError, ResourceError
from refusal_atlas.core.resources import GiB, format_size, free_disk, is_disk_full, parse_size
from refusal_atlas.model.memory import (RUNTIME_BYTES, TOKENS_PER_ROW, estimate, forward_bytes, kv_cache_bytes,
                                        largest_batch, model_shape)
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.settings import load_settings, memory_limit_bytes
from refusal_atlas.workflows.validate import check_memory, export_needs
from tiny import TinyLoaded


@pytest.fixture
def limit():
    """``limit(bytes)`` sets the memory_limit runtime knob for the test."""
    saved = runtime.runtime()

    def set_limit(n):
        runtime.configure(memory_limit=n)

    yield set_limit
    runtime.restore(saved)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    tied = TinyLoaded("qwen2", tie=True)
    save_model_dir(tied.model, tied.tokenizer, root / "tied_bf16", dtype=torch.bfloat16)
    untied = TinyLoaded("qwen2")
    save_model_dir(untied.model, untied.tokenizer, root / "untied_f32")
    return root, tied.model, untied.model


def test_sizes_as_people_write_them():
    assert parse_size("20GiB") == 20 * GiB
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("512mib") == 512 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("twenty", "20 parsecs", "-1GiB"):
        with pytest.raises(ConfigError, match="expected a size"):
            parse_size(bad)
    assert format_size(15.2 * GiB) == "15.2 GiB" and format_size(840 * 2**20) == "840.0 MiB"
    assert memory_limit_bytes(None) is None and memory_limit_bytes("off") == 0 and memory_limit_bytes("2GiB") == 2 * GiB
    with pytest.raises(ConfigError, match="memory_limit"):
        load_settings(values={"runtime": {"memory_limit": "lots"}})


def test_disk_full_is_recognised_with_or_without_errno(tmp_path):
    import errno

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("SafetensorError: Error while serializing: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert free_disk(tmp_path / "not" / "yet" / "made") > 0  # the nearest existing parent's file system


def test_shape_is_read_from_the_files_not_the_weights(model_dirs):
    root, tied, untied = model_dirs
    s = model_shape(str(root / "tied_bf16"))
    stored = sum(p.numel() for n, p in tied.state_dict().items() if n != "lm_head.weight")
    assert s.n_params == stored and s.tied and s.file_dtype == "bfloat16" and s.file_bytes == 2 * stored
    cfg = tied.config
    assert (s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.vocab) == (
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size)
    assert s.largest_tensor == max(p.numel() for p in tied.parameters())
    u = model_shape(str(root / "untied_f32"))
    assert u.n_params == sum(p.numel() for p in untied.state_dict().values()) and not u.tied
    assert u.file_dtype == "float32"
    assert model_shape("no-such-org/no-such-model-anywhere") is None  # nothing local to read: no estimate


def test_estimate_parts(model_dirs):
    root, _, _ = model_dirs
    s = model_shape(str(root / "tied_bf16"))
    same = estimate(s, "bfloat16", batch_size=8)
    assert same.weights == 2 * s.n_params and same.loading == 0 and same.runtime == RUNTIME_BYTES
    assert same.parts["activations"] == forward_bytes(s, 2, 8)
    assert same.total == same.weights + RUNTIME_BYTES + forward_bytes(s, 2, 8)
    # loaded in float32 from a bfloat16 file: the mapped file stays resident while every tensor is converted
    wide = estimate(s, "float32", batch_size=8, generation=(16, 32))
    assert wide.weights == 4 * s.n_params and wide.loading == s.file_bytes
    assert wide.parts["KV cache"] == kv_cache_bytes(s, 4, 16, TOKENS_PER_ROW + 32) == \
        2 * s.n_layers * 16 * (TOKENS_PER_ROW + 32) * s.n_kv_heads * s.head_dim * 4
    assert wide.total == wide.weights + RUNTIME_BYTES + max(wide.loading, sum(wide.parts.values()))
    assert forward_bytes(s, 2, 64) > forward_bytes(s, 2, 8) > 0  # grows with the batch
    assert "weights" in wide.describe() and "KV cache" in wide.describe()


def test_a_job_that_cannot_fit_is_an_error_naming_the_estimate(model_dirs, limit):
    root, _, _ = model_dirs
    settings = load_settings(values={"model": str(root / "untied_f32"), "device": "cpu"})
    limit(10 * 2**20)  # 10 MiB: the runtime alone needs more
    with pytest.raises(ResourceError) as exc:
        check_memory(settings, generates=True)
    msg = str(exc.value)
    assert "needs about" in msg and "10.0 MiB is available (the memory_limit setting)" in msg
    assert "weights" in msg and "--dtype bfloat16" in msg  # float32: the hint halves the weights
    limit(0)  # memory_limit = "off": no check at all
    assert check_memory(settings, generates=True) is settings


def test_a_batch_that_does_not_fit_is_made_smaller(model_dirs, limit, caplog):
    root, _, _ = model_dirs
    settings = load_settings(values={"model": str(root / "untied_f32"), "device": "cpu", "batch_size": 100_000,
                                     "generation_batch_size": 50_000})
    s = model_shape(str(root / "untied_f32"))
    fits_small = estimate(s, "float32", batch_size=8, generation=(8, 32)).total
    limit(fits_small)
    with caplog.at_level(logging.WARNING):
        smaller = check_memory(settings, generates=True)
    # halving lands within a factor of 2 of the batch that fits (8), never above what fits
    assert 4 <= smaller.model.batch_size < 100_000 and 4 <= smaller.evaluation.generation_batch_size < 50_000
    assert estimate(s, "float32", batch_size=smaller.model.batch_size,
                    generation=(smaller.evaluation.generation_batch_size, 32)).total <= fits_small
    assert "running at batch size" in caplog.text and "100000" in caplog.text
    assert settings.model.batch_size == 100_000  # the caller's settings are not changed in place
    limit(None)
    assert check_memory(load_settings(values={"model": str(root / "untied_f32"), "device": "cpu"})).model.batch_size \
        == 32  # what this machine has free is plenty for a tiny model
    assert largest_batch(s, "float32", RUNTIME_BYTES, 8, None, None) is None


def test_export_needs_count_the_untied_head_and_the_output(model_dirs):
    root, tied, _ = model_dirs
    s = model_shape(str(root / "tied_bf16"))
    head = s.vocab * s.d_model
    settings = load_settings(values={"model": str(root / "tied_bf16"), "device": "cpu", "dtype": "bfloat16"})
    parts, written = export_needs(settings, "safetensors", None, None)
    assert parts == {"untied unembedding": 2 * head} and written == 2 * (s.n_params + head) + 2**20
    parts, written = export_needs(settings, "gguf", "q8_0", None)
    assert written == int((s.n_params + head) * 34 / 32) + 32 * 2**20 and "one converted tensor" in parts
    parts, _ = export_needs(settings, "lora", None, None)
    assert parts["weights before the edit"] == 2 * s.n_params  # LoRA keeps the original weights beside
