"""Mixture-of-experts exports: an ablation of every expert written as safetensors, as a PEFT adapter for the original
model (fused experts through PEFT's target_parameters) and as GGUF (qwen2moe, qwen3moe), each read back by its reader
and compared with the hook-edited model's logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.export.formats import export_model
from refusal_atlas.export.gguf import write_gguf
from refusal_atlas.export.lora import snapshot, write_lora
from refusal_atlas.model import ChatFormatter, ModelAdapter
from tiny import PROMPTS_MOE, tiny_bpe_tokenizer, tiny_model, tiny_moe_model, tiny_tokenizer

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral"]
# llama.cpp's qwen2moe / qwen3moe: experts in every layer, its router normalisation; the expert widths are
# transformers' config defaults, which its GGUF reader assumes (it does not read expert_feed_forward_length)
GGUF_MOE = {"qwen2_moe": dict(mlp_only_layers=[], moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
            "qwen3_moe": dict(moe_intermediate_size=768, norm_topk_prob=True)}


def _hooked(model, tokenizer, dirs):
    batch = ChatFormatter(tokenizer).encode(PROMPTS_MOE)
    with ablate(ModelAdapter(model), dirs):
        return batch, model(**batch).logits


def _ablated_lora(model, tok, dirs, out):
    """The hooked logits, then the same ablation written into the weights and saved as a LoRA against the
    original: (batch, hooked logits, write_lora's summary)."""
    batch, hooked = _hooked(model, tok, dirs)
    before = snapshot(model)
    DirectionalAblation(dirs).apply_weights(model)
    return batch, hooked, write_lora(before, model, out, base_model="tiny")


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_of_every_expert_reproduces_the_ablation_on_the_original(arch, tmp_path):
    from peft import PeftModel

    model, tok = tiny_moe_model(arch), tiny_tokenizer()
    dirs = torch.randn(2, model.config.hidden_size)
    batch, hooked, summary = _ablated_lora(model, tok, dirs, tmp_path)
    n_moe = 3 if arch == "qwen2_moe" else 4  # qwen2_moe's layer 1 is dense
    # fused experts as parameters; embedding, o_proj, dense down_proj and shared experts as modules
    assert summary["parameters"] == n_moe
    assert summary["modules"] == 1 + 4 + (4 - n_moe) + (n_moe if arch == "qwen2_moe" else 0)
    assert summary["rank"] == 2 and summary["max_relative_error"] < 1e-5  # exact: rank 2 per expert
    peft_model = PeftModel.from_pretrained(tiny_moe_model(arch), tmp_path)
    assert torch.allclose(peft_model(**batch).logits, hooked, atol=1e-4)  # unmerged adapter
    merged = peft_model.merge_and_unload()
    assert torch.allclose(merged(**batch).logits, hooked, atol=1e-4)
    assert torch.allclose(merged.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj,
                          atol=1e-6)
    assert not torch.allclose(tiny_moe_model(arch)(**batch).logits, hooked, atol=1e-3)


class _Experts(nn.Module):
    """Experts in one of the other layouts: per-expert Linear modules, or a fused [E, inter, d] ``is_transposed``
    parameter (optionally with a per-expert bias, which LoRA cannot carry)."""

    def __init__(self, d: int, inter: int, layout: str, n: int = 3):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.layout = layout
        if layout == "linear":
            self.experts = nn.ModuleList(nn.ModuleDict({"up_proj": nn.Linear(d, inter, bias=False),
                                                        "w2": nn.Linear(inter, d, bias=False)}) for _ in range(n))
            for e in self.experts:
                e.w2 = e["w2"]
        else:
            self.experts = nn.Module()
            self.experts.is_transposed = True
            self.experts.up = nn.Parameter(torch.randn(n, d, inter) / d ** 0.5)
            self.experts.down_proj = nn.Parameter(torch.randn(n, inter, d) / inter ** 0.5)
            if layout == "transposed+bias":
                self.experts.down_proj_bias = nn.Parameter(torch.randn(n, d) * 0.1)

    def forward(self, x):
        weights = torch.softmax(self.gate(x), dim=-1)
        outs = []
        for i in range(weights.shape[-1]):
            if self.layout == "linear":
                outs.append(self.experts[i]["w2"](torch.relu(self.experts[i]["up_proj"](x))))
            else:
                out = torch.relu(x @ self.experts.up[i]) @ self.experts.down_proj[i]
                bias = getattr(self.experts, "down_proj_bias", None)
                outs.append(out if bias is None else out + bias[i])
        return sum(w.unsqueeze(-1) * o for w, o in zip(weights.unbind(-1), outs))


def _with_experts(layout: str):
    model = tiny_model("qwen2")
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = _Experts(model.config.hidden_size, 16, layout)
    return model.requires_grad_(False)


@pytest.mark.parametrize("layout", ["linear", "transposed"])
def test_lora_of_other_expert_layouts(layout, tmp_path):
    from peft import PeftModel

    model, tok = _with_experts(layout), tiny_tokenizer()
    dirs = torch.randn(1, model.config.hidden_size)
    batch, hooked, summary = _ablated_lora(model, tok, dirs, tmp_path)
    # per-expert Linears are modules (3 experts × 4 layers); a transposed fused tensor is one parameter per layer
    assert (summary["modules"], summary["parameters"]) == ((1 + 4 + 12, 0) if layout == "linear" else (1 + 4, 4))
    assert summary["rank"] == 1
    merged = PeftModel.from_pretrained(_with_experts(layout), tmp_path).merge_and_unload()
    assert torch.allclose(merged(**batch).logits, hooked, atol=1e-4)


def test_lora_carries_a_router_change_as_a_2d_parameter(tmp_path):
    """transformers 5's routers are not Linear modules either (their ``weight`` is a bare parameter): a router
    edit (e.g. suppressing experts' logits) goes through target_parameters like the experts."""
    from peft import PeftModel

    model, tok = tiny_moe_model("qwen3_moe"), tiny_tokenizer()
    before = snapshot(model)
    router = model.model.layers[1].mlp.gate
    assert not isinstance(router, nn.Linear) and router.weight.ndim == 2
    with torch.no_grad():
        router.weight[0].mul_(-3.0)  # a rank-1 change of one row: the logit of expert 0
    batch = ChatFormatter(tok).encode(PROMPTS_MOE)
    edited = model(**batch).logits
    summary = write_lora(before, model, tmp_path, base_model="tiny")
    assert (summary["modules"], summary["parameters"], summary["rank"]) == (0, 1, 1)
    merged = PeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), tmp_path).merge_and_unload()
    assert torch.allclose(merged(**batch).logits, edited, atol=1e-4)
    assert not torch.allclose(tiny_moe_model("qwen3_moe")(**batch).logits, edited, atol=1e-3)


def test_lora_refuses_the_expert_layouts_peft_cannot_express(tmp_path):
    model = _with_experts("transposed+bias")
    before = snapshot(model)
    DirectionalAblation(torch.randn(1, model.config.hidden_size)).apply_weights(model)
    with pytest.raises(ModelError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj_bias'.*a bias"):
        write_lora(before, model, tmp_path, base_model="tiny")
    model = tiny_moe_model("mixtral")
    before = snapshot(model)
    with torch.no_grad():  # two fused parameters of one experts module edited
        model.model.layers[0].mlp.experts.down_proj.mul_(1.1)
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(1.1)
    with pytest.raises(ModelError, match="two parameters of 'model.layers.0.mlp.experts'"):
        write_lora(before, model, tmp_path, base_model="tiny")


class _Loaded:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.name, self.source, self.info = model, tokenizer, "tiny-moe", "test", {}


@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_of_an_moe_edit_reload_with_transformers(arch, tmp_path):
    model, tok = tiny_moe_model(arch), tiny_tokenizer()
    dirs = torch.randn(2, model.config.hidden_size)
    batch, hooked = _hooked(model, tok, dirs)
    summary = export_model(_Loaded(model, tok), DirectionalAblation(dirs).apply_weights, tmp_path / "out",
                           dtype="float32")
    assert summary["edit"]["moe_layers"] == (3 if arch == "qwen2_moe" else 4)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.allclose(back(**batch).logits, hooked, atol=1e-4)


@pytest.mark.parametrize("arch,quant,tol", [("qwen2_moe", "f32", 1e-5), ("qwen2_moe", "f16", 2e-3),
                                            ("qwen2_moe", "q8_0", 5e-2), ("qwen3_moe", "f32", 1e-5),
                                            ("qwen3_moe", "f16", 2e-3), ("qwen3_moe", "q8_0", 5e-2)])
def test_gguf_of_an_moe_edit_reloads_with_transformers(arch, quant, tol, tmp_path):
    from gguf import GGUFReader, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    from refusal_atlas.export.gguf import GGUF_ARCHS

    tok = tiny_bpe_tokenizer()
    # q8_0 rounding can move a near-tie router logit and switch a token's top-2 experts (a jump no tolerance
    # covers); with every expert used the routing has no choice to switch, and the quantized weights are checked
    extra = {"num_experts_per_tok": 4} if quant == "q8_0" else {}
    model = tiny_moe_model(arch, vocab_size=len(tok) + 5, **GGUF_MOE[arch], **extra)
    dirs = torch.randn(2, model.config.hidden_size)
    batch, hooked = _hooked(model, tok, dirs)
    DirectionalAblation(dirs).apply_weights(model)
    edited = model(**batch).logits
    assert torch.allclose(edited, hooked, atol=1e-4)
    write_gguf(model, tok, tmp_path / "m.gguf", quant)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert back.config.model_type == arch and back.config.num_experts_per_tok == model.config.num_experts_per_tok
    # q8_0's tolerance is wider than the dense tests' 2e-2: each expert row sums 768 or 1408 rounded products, not 64
    err = (back(**batch).logits - edited).abs().max().item()
    assert err < tol, err
    clean = tiny_moe_model(arch, vocab_size=len(tok) + 5, **GGUF_MOE[arch], **extra)(**batch).logits
    assert err < 0.2 * (clean - edited).abs().max().item()  # the file carries the edit, not only the model
    # llama.cpp's names for the architecture, its expert hyper-parameters, routers kept in F32
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    gguf_arch = GGUF_ARCHS[arch][0]
    arch_id = next(a for a, name in MODEL_ARCH_NAMES.items() if name == gguf_arch)
    allowed = {TENSOR_NAMES[t].replace("{bid}", str(i)) for t in MODEL_TENSORS[arch_id] for i in range(4)}
    names = {t.name.rsplit(".", 1)[0] for t in reader.tensors}
    assert names <= allowed and "blk.3.ffn_down_exps" in names and "blk.0.ffn_gate_exps" in names
    assert ("blk.0.ffn_down_shexp" in names) == (arch == "qwen2_moe")
    field = {k: reader.fields[k].contents() for k in reader.fields if k.startswith(gguf_arch + ".expert")}
    assert field[f"{gguf_arch}.expert_count"] == 4
    assert field[f"{gguf_arch}.expert_used_count"] == model.config.num_experts_per_tok
    assert field[f"{gguf_arch}.expert_feed_forward_length"] == model.config.moe_intermediate_size
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert tuple(reversed([int(n) for n in down.shape])) == (4, 32, model.config.moe_intermediate_size)
    router = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_inp.weight")
    assert router.tensor_type.name == "F32"
    if quant == "q8_0":
        assert down.tensor_type.name == "Q8_0"


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path):
    tok = tiny_bpe_tokenizer()
    cases = [(tiny_moe_model("mixtral", vocab_size=len(tok) + 5), "GGUF export supports .*qwen3_moe.*'mixtral'"),
             (tiny_moe_model("qwen2_moe", vocab_size=len(tok) + 5), r"experts in every layer.*mlp_only_layers=\[1\]"),
             (tiny_moe_model("qwen3_moe", vocab_size=len(tok) + 5), "needs norm_topk_prob=True")]
    for model, message in cases:
        with pytest.raises(ConfigError, match=message):
            write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def _moe_run(root, arch, **config):
    from refusal_atlas.core.io import write_json
    from refusal_atlas.core.rundir import RunDir
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.model.saving import save_model_dir

    tok = tiny_bpe_tokenizer()
    save_model_dir(tiny_moe_model(arch, vocab_size=len(tok) + 5, **config), tok, root / "model")
    run = RunDir(root / "run", create=True)
    write_json(run.manifest_path, {"config": dict(model=str(root / "model"), device="cpu", batch_size=4),
                                   "status": "complete"})
    torch.manual_seed(0)
    DirectionSet(torch.randn(2, 32) * 4, layer=2, method="dim").save(run.direction_path("dim"))
    return run.path


def test_cli_exports_an_moe_run_as_lora_and_gguf_that_agree(tmp_path, capsys):
    from peft import PeftModel
    from test_evaluate import cli

    run = _moe_run(tmp_path, "qwen3_moe", **GGUF_MOE["qwen3_moe"])
    for fmt, extra in (("lora", []), ("gguf", ["--quant", "f32"])):  # f32: a rounded router logit could switch experts
        code, _, err = cli(["export", "-r", str(run), "--out", str(tmp_path / fmt), "--format", fmt, *extra], capsys)
        assert code == 0, err
        code, stdout, _ = cli(["verify", str(tmp_path / fmt), "--rerun"], capsys)  # the export is reproducible
        assert code == 0 and "model files identical byte for byte" in stdout
    tok = tiny_bpe_tokenizer()
    batch = ChatFormatter(tok).encode(PROMPTS_MOE)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    clean = original(**batch).logits
    lora = PeftModel.from_pretrained(original, tmp_path / "lora").merge_and_unload()(**batch).logits
    gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf",
                                                dtype=torch.float32).eval()(**batch).logits
    assert (lora - gguf).abs().max() < 1e-4  # the same edit in both files
    assert (lora - clean).abs().max() > 0.05


def test_cli_refuses_a_gguf_llama_cpp_cannot_run_before_loading(tmp_path, capsys, monkeypatch):
    from test_evaluate import cli

    import refusal_atlas.workflows.workspace as workspace

    run = _moe_run(tmp_path, "qwen2_moe")  # layer 1 is dense: llama.cpp's qwen2moe has experts in every layer
    monkeypatch.setattr(workspace, "reopen_workspace", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = cli(["export", "-r", str(run), "--out", str(tmp_path / "g"), "--format", "gguf"], capsys)
    assert code == 2 and err.startswith("error: ") and "experts in every layer" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "g").exists()
