"""Exports without a second copy of the weights: safetensors and GGUF streamed tensor by tensor, edits in place.

The writers produce each tensor just before writing it and convert or quantize a block of rows at a time;
the edits map a slab of a weight at a time. Block sizes must not change a single byte, and the memory an
export adds to the loaded model must stay far below the model's own size (measured in a fresh process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import refusal_atlas.edits.writes as writes
import refusal_atlas.export.gguf as gguf_export
from refusal_atlas.core.errors import ArtifactError
from refusal_atlas.core.io import TensorEntry, stream_safetensors
from refusal_atlas.edits import DirectionalAblation, LayerwiseAblation
from tiny import tiny_bpe_tokenizer, tiny_model, tiny_moe_model

TESTS = Path(__file__).resolve().parents[1]


def _entry(name, t):
    return TensorEntry(name, tuple(t.shape), t.dtype, lambda: t)


def test_streamed_safetensors_read_back_exactly_and_aligned(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.f32": torch.randn(3, 5), "b.bf16": torch.randn(7).to(torch.bfloat16),
               "c.f16": torch.randn(2, 3).half(), "d.i64": torch.arange(5), "e.bool": torch.tensor([True, False, True]),
               "f.scalar": torch.tensor(2.5), "g.empty": torch.zeros(0, 4), "h.u8": torch.arange(3, dtype=torch.uint8)}
    path = stream_safetensors(tmp_path / "x.safetensors", [_entry(k, v) for k, v in tensors.items()],
                              metadata={"format": "pt"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert (8 + header_len) % 8 == 0
    for k, v in tensors.items():  # every tensor starts at a multiple of its element size
        assert header[k]["data_offsets"][0] % v.element_size() == 0, k
    with pytest.raises(ArtifactError, match="announced"):
        stream_safetensors(tmp_path / "y.safetensors", [TensorEntry("w", (2, 2), torch.float32, lambda: torch.ones(3))])


def test_edits_in_slabs_equal_the_whole_matrix_edit(monkeypatch):
    """Slab size changes no value: the ablation (embedding, o_proj, down_proj) and a norm-preserving
    layerwise edit give the same weights mapped 5 elements at a time as all at once."""
    dirs = torch.randn(2, 32)
    results = {}
    for chunk in (5, 1 << 30):
        monkeypatch.setattr(writes, "CHUNK_ELEMENTS", chunk)
        a = tiny_model("qwen2", seed=3)
        DirectionalAblation(dirs).apply_weights(a)
        b = tiny_model("qwen2", seed=3)
        LayerwiseAblation(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), [0.5] * 4, [1.0] * 4,
                          norm_preserving=True, embed_weight=0.7).apply_weights(b)
        results[chunk] = (a.state_dict(), b.state_dict())
    for small, whole in zip(results[5], results[1 << 30]):
        for name in whole:
            assert torch.allclose(small[name], whole[name], atol=1e-6, rtol=0), name
    # and the weights did change: this is not a no-op compared with itself
    untouched = tiny_model("qwen2", seed=3).state_dict()
    assert not torch.equal(results[5][0]["model.embed_tokens.weight"], untouched["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch,quant", [("qwen2", "q8_0"), ("qwen2", "f16"), ("llama", "q4_0"), ("qwen2", "bf16"),
                                        ("qwen2_moe", "q8_0")])
def test_gguf_row_blocks_change_no_byte(arch, quant, tmp_path, monkeypatch):
    """Also for stacked experts, converted one expert at a time (gate_up_proj's halves are views, not copies)."""
    tok = tiny_bpe_tokenizer()
    model = (tiny_moe_model(arch, vocab_size=len(tok) + 5, mlp_only_layers=[]) if arch.endswith("_moe")
             else tiny_model(arch, vocab_size=len(tok) + 5))
    files = {}
    for chunk in (7, 1 << 30):  # 7 elements: less than a row, so every row is its own block
        monkeypatch.setattr(gguf_export, "CHUNK_ELEMENTS", chunk)
        files[chunk] = gguf_export.write_gguf(model, tok, tmp_path / f"{chunk}.gguf", quant).read_bytes()
    assert files[7] == files[1 << 30]
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "7.gguf"))
    assert sum(int(t.n_bytes) for t in reader.tensors) == gguf_export.gguf_size(model, quant)


_PEAK = """
import json, re, sys, torch
sys.path.insert(0, {tests!r})
import refusal_atlas.edits.writes as writes, refusal_atlas.export.gguf as g
writes.CHUNK_ELEMENTS = g.CHUNK_ELEMENTS = 1 << 18  # small blocks: the test model is small too
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.export.formats import export_model
from tiny import tiny_bpe_tokenizer, tiny_model, tiny_moe_model

class Loaded:
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_model("qwen2", n_layers=8, d_model=512, vocab_size=30000)
    name, source, info = "peak", "test", {{}}

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

size = sum(p.numel() * p.element_size() for p in Loaded.model.parameters())
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to what is resident now
export_model(Loaded, DirectionalAblation(torch.randn(1, 512)).apply_weights, sys.argv[1], sys.argv[2],
             quant=sys.argv[3] if len(sys.argv) > 3 else None, dtype="float32" if sys.argv[2] == "safetensors" else None)
print(json.dumps({{"base": base, "peak": status("VmHWM"), "model": size}}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("fmt", [["safetensors"], ["gguf", "q8_0"]])
def test_an_export_adds_far_less_than_a_copy_of_the_model(fmt, tmp_path):
    """Before streaming, safetensors export cloned every tensor (+100 %) and GGUF held every converted tensor
    until the end; now the export adds one tensor in its output type and a few small row blocks."""
    proc = subprocess.run([sys.executable, "-c", _PEAK.format(tests=str(TESTS)), str(tmp_path / "out"), *fmt],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    added = m["peak"] - m["base"]
    assert m["model"] > 150e6  # a model large enough for a copy to show
    assert added < 0.35 * m["model"], f"export added {added / 2**20:.0f} MiB to a {m['model'] / 2**20:.0f} MiB model"
