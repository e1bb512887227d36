"""Edits: hooks equal weight edits wherever they are mathematically equal (qwen2, llama tied/untied,
mistral), the weight context restores bit-identical weights, export writes the evaluated edit,
kernels follow heretic's definition, direction sources, save/load and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import ActAdd, DirectionalAblation, LayerwiseAblation, StrengthKernel, load_edit
from refusal_atlas.search.sources import EditContext
from refusal_atlas.core.errors import ArtifactError, ConfigError, ModelError
from refusal_atlas.edits.ablation import ablate
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.model.saving import save_model_dir
from tiny import TinyLoaded

ARCHS = [("qwen2", False), ("llama", True), ("llama", False), ("mistral", False)]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _orthogonal(k: int, d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_rand(d, k, seed=3))
    return 3.0 * q.T  # non-unit norms on purpose


def _edits(n_layers: int, d: int) -> dict:
    kern_a, kern_m = StrengthKernel(1.2, 2.0, 0.3, 1.5), StrengthKernel(0.9, 1.0, 0.5, 3.0)
    per_layer = _rand(n_layers, 1, d, seed=1)
    subset = _rand(2, d, seed=2).expand(n_layers, 2, d)
    return {
        "full-subspace": DirectionalAblation(_rand(2, d, seed=4), "subspace"),
        "full-sequential-orthogonal": DirectionalAblation(_orthogonal(2, d), "sequential"),
        "kernel-per-layer": LayerwiseAblation.from_kernels(per_layer, kern_a, kern_m),
        "kernel-one-direction-norm-preserving": LayerwiseAblation.from_kernels(
            _rand(d, seed=5).expand(n_layers, d), kern_a, kern_m, norm_preserving=True),
        "kernel-subset-sequential": LayerwiseAblation.from_kernels(subset, kern_a, kern_m, mode="sequential"),
        "kernel-subset-subspace-norm": LayerwiseAblation.from_kernels(subset, kern_a, kern_m, norm_preserving=True),
        "kernel-embedding-norm": LayerwiseAblation.from_kernels(per_layer, kern_a, kern_m, norm_preserving=True,
                                                               embed_weight=0.8),
    }


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,tie", ARCHS)
def test_hooks_equal_weights_and_weights_restore_exactly(arch, tie, prompts, tmp_path):
    tiny = TinyLoaded(arch, tie=tie)
    model, adapter, chat = tiny.model, ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    batch = chat.encode(prompts)
    clean = model(**batch).logits
    before = _state(model)
    for name, edit in _edits(adapter.n_layers, adapter.d_model).items():
        assert edit.hooks_equal_weights, name
        with edit.hooks(adapter):
            hooked = model(**batch).logits
        with edit.weights(adapter) as report:
            weighted = model(**batch).logits
            if name.startswith("full") or "embedding" in name:
                assert report["untied_embeddings"] == tie and not adapter.embeddings_tied
        assert torch.allclose(hooked, weighted, atol=1e-4), (name, (hooked - weighted).abs().max())
        assert not torch.allclose(hooked, clean, atol=1e-3), name
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), name  # bit-identical restore
        assert adapter.embeddings_tied == tie
        assert torch.equal(model(**batch).logits, clean)
    # export writes exactly the evaluated edit: permanent weights, saved, reloaded
    edit = _edits(adapter.n_layers, adapter.d_model)["kernel-one-direction-norm-preserving"]
    with edit.apply(adapter):
        evaluated = model(**batch).logits
    edit.apply_weights(model)
    save_model_dir(model, tiny.tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.allclose(reloaded(**batch).logits, evaluated, atol=1e-4)


def test_full_ablation_weights_equal_existing_hook_ablation(prompts):
    tiny = TinyLoaded("qwen2")
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    batch = chat.encode(prompts)
    dirs = _rand(3, adapter.d_model, seed=8)
    with ablate(adapter, dirs):
        reference = tiny.model(**batch).logits
    with DirectionalAblation(dirs).weights(adapter):
        assert torch.allclose(tiny.model(**batch).logits, reference, atol=1e-4)


def test_sequential_correlated_directions_are_evaluated_as_the_exported_weights(prompts):
    tiny = TinyLoaded("qwen2")
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    batch = chat.encode(prompts)
    dirs = _rand(2, adapter.d_model, seed=9)
    dirs[1] += 2 * dirs[0]  # strongly correlated: the product of projectors is not idempotent
    edit = DirectionalAblation(dirs, "sequential")
    assert not edit.hooks_equal_weights
    with edit.hooks(adapter):
        hooked = tiny.model(**batch).logits
    with edit.apply(adapter):
        evaluated = tiny.model(**batch).logits
    with edit.weights(adapter):
        weighted = tiny.model(**batch).logits
    assert torch.equal(evaluated, weighted)
    assert not torch.allclose(hooked, weighted, atol=1e-3)  # hooks project block inputs a second time
    # the weight form is the product of rank-1 projectors applied to every write
    u = dirs / dirs.norm(dim=1, keepdim=True)
    t = (torch.eye(adapter.d_model) - torch.outer(u[1], u[1])) @ (torch.eye(adapter.d_model) - torch.outer(u[0], u[0]))
    w0 = adapter.attn_out_proj(0).weight.detach().clone()
    edit.apply_weights(tiny.model)
    assert torch.allclose(adapter.attn_out_proj(0).weight, t @ w0, atol=1e-5)


def test_weight_edit_formulas():
    tiny = TinyLoaded("qwen2")
    adapter = ModelAdapter(tiny.model)
    d, n = adapter.d_model, adapter.n_layers
    r = _rand(d, seed=11)
    r = r / r.norm()
    kern = StrengthKernel(0.7, 1.0, 0.7, 10.0)
    w_attn, w_mlp = adapter.attn_out_proj(1).weight.detach().clone(), adapter.mlp_out_proj(1).weight.detach().clone()
    with LayerwiseAblation.from_kernels(r.expand(n, d), kern, kern).weights(adapter):
        assert torch.allclose(adapter.attn_out_proj(1).weight, w_attn - 0.7 * torch.outer(r, r) @ w_attn, atol=1e-6)
    with LayerwiseAblation.from_kernels(r.expand(n, d), kern, kern, norm_preserving=True).weights(adapter):
        new = adapter.mlp_out_proj(1).weight
        assert torch.allclose(new.norm(dim=0), w_mlp.norm(dim=0), atol=1e-5)  # each write vector keeps its norm
        assert not torch.allclose(new, w_mlp, atol=1e-3)


def test_kernel_follows_heretics_definition_and_rejects_bad_input():
    w = StrengthKernel(peak=1.2, position=5.0, floor=0.4, distance=2.0).weights(10)
    assert w[5] == pytest.approx(1.2) and w[4] == w[6] == pytest.approx(0.8) and w[3] == w[7] == pytest.approx(0.4)
    assert w[2] == w[8] == 0.0 and w[0] == 0.0
    assert StrengthKernel.constant(4).weights(4) == [1.0] * 4
    for bad, match in [((1, 12.0, 0.5, 2), "outside the layers"), ((1, -1.0, 0.5, 2), "outside the layers"),
                       ((1, 3.0, 0.5, 0), "distance must be > 0"), ((-1, 3.0, 0.5, 2), ">= 0")]:
        with pytest.raises(ConfigError, match=match):
            StrengthKernel(*bad).weights(10)


def _context(n: int = 4, d: int = 8) -> EditContext:
    return EditContext(_rand(n, d, seed=20) * torch.arange(1, n + 1).unsqueeze(1), _rand(n, d, seed=21))


def test_direction_sources():
    ctx = _context()
    unit = ctx.dim / ctx.dim.norm(dim=1, keepdim=True)
    assert torch.allclose(ctx.at_index(2.0, False), unit[2], atol=1e-6)
    mid = 0.75 * unit[1] + 0.25 * unit[2]
    assert torch.allclose(ctx.at_index(1.25, False), mid / mid.norm(), atol=1e-6)
    proj = ctx.at_index(2.0, True)
    assert abs(float(proj @ ctx.harmless_mean[2])) < 1e-5 and float(proj.norm()) == pytest.approx(1.0)
    per = ctx.per_layer(False)
    assert per.shape == (4, 1, 8) and torch.allclose(per[0, 0], unit[1]) and torch.allclose(per[3, 0], unit[3])
    with pytest.raises(ConfigError, match="outside the layers"):
        ctx.at_index(3.5, False)
    other = DirectionSet(torch.randn(3, 16), layer=1, method="som")
    with pytest.raises(ConfigError, match="another model"):
        EditContext(ctx.dim, ctx.harmless_mean, {"som": other})
    deep = DirectionSet(torch.randn(3, 8), layer=9, method="som")
    with pytest.raises(ConfigError, match="another model"):
        EditContext(ctx.dim, ctx.harmless_mean, {"som": deep})


def test_save_load_roundtrip_and_model_mismatch(tmp_path, prompts):
    tiny = TinyLoaded("qwen2")
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    batch = chat.encode(prompts)
    for edit in _edits(adapter.n_layers, adapter.d_model).values():
        path = edit.save(tmp_path / "edits" / "e")
        loaded = load_edit(path)
        assert loaded.fingerprint() == edit.fingerprint() and loaded.spec() == edit.spec()
        with edit.apply(adapter):
            a = tiny.model(**batch).logits
        with loaded.apply(adapter):
            assert torch.equal(tiny.model(**batch).logits, a)
    wrong = LayerwiseAblation.from_kernels(_rand(7, 1, adapter.d_model), StrengthKernel.constant(7),
                                           StrengthKernel.constant(7))
    with pytest.raises(ModelError, match="7 layers"):
        wrong.apply(adapter)
    with pytest.raises(ModelError, match="d_model 5"):
        DirectionalAblation(torch.randn(1, 5)).apply(adapter)
    (tmp_path / "edits" / "bad.json").write_text('{"edit": "nope", "spec": {}}')
    with pytest.raises(ArtifactError, match="not a saved edit"):
        load_edit(tmp_path / "edits" / "bad.json")
    with pytest.raises(ArtifactError, match="no saved edit"):
        load_edit(tmp_path / "edits" / "missing")


def test_actadd_is_hooks_only(tiny_parts, prompts):
    tiny, adapter, chat = tiny_parts
    batch = chat.encode(prompts)
    edit = ActAdd(_rand(adapter.d_model, seed=30), layer=1, coeff=2.0)
    clean = tiny.model(**batch).logits
    with edit.apply(adapter):
        assert not torch.allclose(tiny.model(**batch).logits, clean, atol=1e-3)
    with pytest.raises(ConfigError, match="hooks only"):
        edit.apply_weights(tiny.model)


def test_post_norm_architecture_full_ablation_weights_refused_layerwise_equal(prompts):
    tiny = TinyLoaded("gemma2")
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    with pytest.raises(ModelError, match="post-norms"):
        DirectionalAblation(torch.randn(1, adapter.d_model)).apply_weights(tiny.model)
    batch = chat.encode(prompts)
    edit = LayerwiseAblation.from_kernels(_rand(adapter.n_layers, 1, adapter.d_model), StrengthKernel(1, 1, 0.5, 2),
                                          StrengthKernel(1, 2, 0.5, 2))
    with edit.hooks(adapter):
        hooked = tiny.model(**batch).logits
    with edit.weights(adapter):
        assert torch.allclose(tiny.model(**batch).logits, hooked, atol=1e-4)
