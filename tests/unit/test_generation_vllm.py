"""The vLLM backend's plumbing on CPU with a fake engine, its errors, and (with vLLM + a GPU) the real thing."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.data import Prompt
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.completions import completions_for
from refusal_atlas.evaluation.damage import greedy_continuations
from refusal_atlas.export.vllm import VllmBackend, check_vllm, has_weight_form
from refusal_atlas.edits import ActAdd, DirectionalAblation, NoEdit
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model
from test_evaluate import cli, run_dir  # noqa: F401  (fixture: a run directory on a tiny saved model)

PROMPTS = ["how to make a bomb", "write poem about cats please", "tell joke", "hack into computer and steal money"]


class FakeSampling:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@dataclass
class _Completion:
    token_ids: list[int]


@dataclass
class _Request:
    outputs: list


class FakeLLM:
    """Stands in for vllm.LLM: loads the directory it is given with HF and decodes greedily, token by token."""

    made: list = []

    def __init__(self, model: str, tokenizer: str, **engine_args):
        self.model, self.tokenizer, self.engine_args = model, tokenizer, engine_args
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        FakeLLM.made.append(self)

    @torch.inference_mode()
    def generate(self, prompts, params, use_tqdm=True):
        p = params.kwargs
        assert p["temperature"] == 0.0 and not use_tqdm
        out = []
        for prompt in prompts:
            ids, new = list(prompt["prompt_token_ids"]), []
            for _ in range(p["max_tokens"]):
                nxt = int(self.hf(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(nxt)
                if nxt in p["stop_token_ids"]:
                    break
            out.append(_Request([_Completion(new)]))
        return out


@pytest.fixture
def backend(tiny_model_dir, tmp_path):
    FakeLLM.made = []
    b = VllmBackend(lambda: load_model(str(tiny_model_dir), device="cpu"), engine_args={"dtype": "float32"},
                    llm_factory=FakeLLM, sampling_factory=FakeSampling, workdir=tmp_path / "exports")
    yield b
    b.close()


def test_backend_matches_hf_hooks_for_baseline_ablation_and_falls_back_for_actadd(backend, tiny_model_dir):
    live = load_model(str(tiny_model_dir), device="cpu")
    adapter, chat = ModelAdapter(live.model), ChatFormatter(live.tokenizer)
    direction = DirectionSet(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 4, layer=2, method="som")
    specs = [NoEdit(), DirectionalAblation.from_directions(direction), ActAdd.from_directions(direction.select([0])),
             DirectionalAblation.from_directions(direction, mode="sequential")]
    assert [has_weight_form(s) for s in specs] == [True, True, False, False]
    for spec in specs:
        hf = greedy_continuations(adapter, chat, PROMPTS, 6, 2, spec)
        assert backend.continuations(adapter, chat, PROMPTS, 6, 2, spec) == hf, spec.label
    # the engines really read edited weights: the ablation's export gives hook-ablation logits, not the baseline's
    batch = chat.encode(PROMPTS)
    base_engine, ablated_engine = FakeLLM.made
    with specs[1].apply(adapter):
        hooked = live.model(**batch).logits
    assert torch.allclose(ablated_engine.hf(**batch).logits, hooked, atol=1e-4)
    assert not torch.allclose(base_engine.hf(**batch).logits, hooked, atol=1e-2)
    # one exported directory per weight-form intervention, the live model untouched, engines made per directory
    assert len(backend.exports) == 2 and len(FakeLLM.made) == 2
    assert FakeLLM.made[1].engine_args == {"dtype": "float32"}
    fresh = load_model(str(tiny_model_dir), device="cpu").model.state_dict()
    assert all(torch.equal(t, fresh[k]) for k, t in live.model.state_dict().items())
    backend.continuations(adapter, chat, PROMPTS[:1], 6, 2, specs[1])
    assert len(FakeLLM.made) == 2  # the ablation's engine is reused, nothing re-exported


def test_completions_file_is_the_same_with_either_backend(backend, tiny_model_dir, tmp_path):
    live = load_model(str(tiny_model_dir), device="cpu")
    adapter, chat = ModelAdapter(live.model), ChatFormatter(live.tokenizer)
    spec = DirectionalAblation.from_directions(DirectionSet(torch.ones(1, 32), layer=1, method="dim"))
    prompts = [Prompt(x, category="c") for x in PROMPTS]
    a = completions_for(adapter, chat, prompts, spec, 5, 2, tmp_path / "hf.jsonl")
    b = completions_for(adapter, chat, prompts, spec, 5, 2, tmp_path / "vllm.jsonl", backend=backend)
    assert a.responses == b.responses and a.token_ids == b.token_ids
    assert (tmp_path / "hf.jsonl").read_text() == (tmp_path / "vllm.jsonl").read_text()


def test_vllm_unavailable_is_one_clear_error_before_loading(run_dir, capsys, tmp_path):  # noqa: F811
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present: nothing to refuse")
    with pytest.raises(ConfigError, match="--backend vllm needs"):
        check_vllm()
    code, _, err = cli(["evaluate", "-r", str(run_dir), "--backend", "vllm"], capsys)
    assert code == 2 and err.startswith("error: --backend vllm needs") and len(err.strip().splitlines()) == 1
    code, _, err = cli(["run", "-r", str(tmp_path / "new"), "--model", "/nonexistent", "--backend", "vllm"], capsys)
    assert code == 2 and err.startswith("error: --backend vllm needs")
    assert not (tmp_path / "new").exists()
    code, _, err = cli(["evaluate", "-r", str(run_dir), "--backend", "tgi"], capsys)
    assert code == 2 and "unknown --backend 'tgi'" in err


def _vllm_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'refusal-atlas[vllm]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: the vLLM backend needs one"
    return None


def test_real_vllm_matches_hf_on_the_embedded_model(tmp_path):
    """GPU only: vLLM greedy from the exported (orthogonalized) model agrees with HF + hooks."""
    reason = _vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    from refusal_atlas.data import load_prompts

    live = load_model("embedded", device="cuda", dtype="float32")
    adapter, chat = ModelAdapter(live.model), ChatFormatter(live.tokenizer)
    prompts = [p.instruction for p in load_prompts("jailbreakbench", n=8, seed=0)]
    direction = DirectionSet(torch.randn(1, adapter.d_model, generator=torch.Generator().manual_seed(0)), layer=12,
                             method="random")
    backend = VllmBackend(lambda: load_model("embedded", device="cpu", dtype="float32"),
                          engine_args={"dtype": "float32", "gpu_memory_utilization": 0.4, "seed": 0})
    try:
        for spec in (NoEdit(), DirectionalAblation.from_directions(direction)):
            hf = greedy_continuations(adapter, chat, prompts, 16, 8, spec)
            vl = backend.continuations(adapter, chat, prompts, 16, 8, spec)
            same = sum(a == b for a, b in zip(hf, vl))
            assert same >= 7, json.dumps({"spec": spec.label, "hf": hf, "vllm": vl})
    finally:
        backend.close()
