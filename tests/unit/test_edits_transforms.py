"""The Householder and biprojection transforms of the layer-wise edit: hooks equal weights, the formulas
(a reflection of every write; directions orthogonal to the harmless mean of the layer written into),
fingerprints of plain edits unchanged, save/load/export, bad input, and the search's ``transform`` choice."""

from __future__ import annotations

import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.edits import LayerwiseAblation, StrengthKernel, load_edit
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.search.edit_space import EditSpace, build_edit, describe_choice
from refusal_atlas.search.sources import EditContext
from tiny import TinyLoaded

ARCHS = [("qwen2", False), ("llama", True), ("mistral", False), ("gemma2", False)]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _edits(n: int, d: int) -> dict[str, LayerwiseAblation]:
    ka, km = StrengthKernel(1.1, 2.0, 0.4, 2.0), StrengthKernel(0.8, 1.0, 0.5, 3.0)
    one, per_layer, subset = _rand(d, seed=1).expand(n, d), _rand(n, 1, d, seed=2), _rand(2, d, seed=3).expand(n, 2, d)
    means = _rand(n, d, seed=4) + 2.0
    return {
        "householder": LayerwiseAblation.from_kernels(one, ka, km, transform="householder"),
        "householder-sequential-embed": LayerwiseAblation.from_kernels(subset, ka, km, mode="sequential",
                                                                       transform="householder", embed_weight=0.5),
        "householder-norm": LayerwiseAblation.from_kernels(per_layer, ka, km, transform="householder",
                                                           norm_preserving=True),
        "biproject": LayerwiseAblation.from_kernels(one, ka, km, transform="biproject", harmless_means=means),
        "biproject-norm-embed": LayerwiseAblation.from_kernels(subset, ka, km, transform="biproject",
                                                               harmless_means=means, norm_preserving=True,
                                                               embed_weight=1.0),
    }


@pytest.mark.parametrize("arch,tie", ARCHS)
def test_transforms_hooks_equal_weights_and_restore_exactly(arch, tie, prompts):
    tiny = TinyLoaded(arch, tie=tie)
    model, adapter, chat = tiny.model, ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    batch = chat.encode(prompts)
    clean = model(**batch).logits
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, edit in _edits(adapter.n_layers, adapter.d_model).items():
        assert edit.hooks_equal_weights and edit.evaluated_form == "hooks", name
        with edit.hooks(adapter):
            hooked = model(**batch).logits
        with edit.weights(adapter) as report:
            weighted = model(**batch).logits
        assert report["transform"] == edit.transform
        assert torch.allclose(hooked, weighted, atol=1e-4), (name, (hooked - weighted).abs().max())
        assert not torch.allclose(hooked, clean, atol=1e-3), name
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), name  # bit-identical restore
        assert torch.equal(model(**batch).logits, clean)


def test_householder_reflects_every_write():
    tiny = TinyLoaded("qwen2")
    adapter = ModelAdapter(tiny.model)
    d, n = adapter.d_model, adapter.n_layers
    r = _rand(d, seed=5)
    u = r / r.norm()
    reflect = torch.eye(d) - 2 * torch.outer(u, u)
    w = adapter.attn_out_proj(1).weight.detach().clone()
    full = StrengthKernel.constant(n, 1.0)
    edit = LayerwiseAblation.from_kernels(r.expand(n, d), full, full, transform="householder")
    with edit.weights(adapter):
        new = adapter.attn_out_proj(1).weight.detach().clone()
        assert torch.allclose(new, reflect @ w, atol=1e-5)
        assert torch.allclose(new.norm(dim=0), w.norm(dim=0), atol=1e-5)  # an isometry: write norms kept
        assert torch.allclose(u @ new, -(u @ w), atol=1e-5)  # the direction's component flips sign
        edit.apply_weights(tiny.model)  # reflecting twice is the identity
        assert torch.allclose(adapter.attn_out_proj(1).weight, w, atol=1e-5)
    half = StrengthKernel.constant(n, 0.5)  # strength 0.5 of a reflection = full projection
    projected = LayerwiseAblation.from_kernels(r.expand(n, d), full, full)
    with LayerwiseAblation.from_kernels(r.expand(n, d), half, half, transform="householder").weights(adapter):
        halfway = adapter.mlp_out_proj(2).weight.detach().clone()
    with projected.weights(adapter):
        assert torch.allclose(adapter.mlp_out_proj(2).weight, halfway, atol=1e-6)


def test_biprojection_leaves_the_harmless_mean_of_each_written_layer_alone(prompts):
    tiny = TinyLoaded("llama")
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    d, n = adapter.d_model, adapter.n_layers
    r, means = _rand(d, seed=6), _rand(n, d, seed=7)
    full = StrengthKernel.constant(n, 1.0)
    edit = LayerwiseAblation.from_kernels(r.expand(n, d), full, full, transform="biproject", harmless_means=means,
                                          embed_weight=1.0)
    plain = LayerwiseAblation.from_kernels(r.expand(n, d), full, full, embed_weight=1.0)
    originals = {j: adapter.mlp_out_proj(j).weight.detach().clone() for j in range(n)}
    with edit.weights(adapter):
        for j in range(n):
            g = means[min(j + 1, n - 1)]
            g = g / g.norm()
            new = adapter.mlp_out_proj(j).weight
            assert torch.allclose(g @ new, g @ originals[j], atol=1e-5)  # writes along the harmless mean kept
            assert not torch.allclose(new, originals[j], atol=1e-3)
        batch = chat.encode(prompts)
        biprojected = tiny.model(**batch).logits
    with plain.weights(adapter):
        g = means[2] / means[2].norm()
        assert not torch.allclose(g @ adapter.mlp_out_proj(1).weight, g @ originals[1], atol=1e-4)
        assert not torch.allclose(tiny.model(**batch).logits, biprojected, atol=1e-4)


def test_plain_edits_keep_their_spec_and_fingerprint_and_transforms_round_trip(tmp_path, prompts):
    n, d = 4, 32
    edits = _edits(n, d)
    plain = LayerwiseAblation.from_kernels(_rand(d, seed=1).expand(n, d), StrengthKernel.constant(n),
                                           StrengthKernel.constant(n))
    assert "transform" not in plain.spec() and set(plain.tensors()) == {"directions"}  # fingerprints of old edits
    assert edits["householder"].fingerprint() != LayerwiseAblation.from_kernels(
        _rand(d, seed=1).expand(n, d), StrengthKernel(1.1, 2.0, 0.4, 2.0), StrengthKernel(0.8, 1.0, 0.5, 3.0)).fingerprint()
    tiny = TinyLoaded("qwen2")
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    batch = chat.encode(prompts)
    for name, edit in edits.items():
        edit.save(tmp_path / name)
        back = load_edit(tmp_path / name)
        assert back.transform == edit.transform and back.fingerprint() == edit.fingerprint(), name
        if edit.transform == "biproject":
            assert torch.equal(back.harmless_means, edit.harmless_means)
    edit = edits["biproject-norm-embed"]  # export writes exactly the evaluated edit
    with edit.apply(adapter):
        evaluated = tiny.model(**batch).logits
    edit.apply_weights(tiny.model)
    save_model_dir(tiny.model, tiny.tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.allclose(reloaded(**batch).logits, evaluated, atol=1e-4)


def test_transform_bad_input():
    n, d = 3, 8
    r, k = _rand(d).expand(n, d), StrengthKernel.constant(n)
    with pytest.raises(ConfigError, match="unknown transform 'mirror'"):
        LayerwiseAblation.from_kernels(r, k, k, transform="mirror")
    with pytest.raises(ConfigError, match="needs the harmless mean"):
        LayerwiseAblation.from_kernels(r, k, k, transform="biproject")
    with pytest.raises(ConfigError, match="biproject transform only"):
        LayerwiseAblation.from_kernels(r, k, k, transform="householder", harmless_means=torch.ones(n, d))
    with pytest.raises(ConfigError, match="harmless means must be"):
        LayerwiseAblation.from_kernels(r, k, k, transform="biproject", harmless_means=torch.ones(n + 1, d))
    parallel = LayerwiseAblation.from_kernels(r, k, k, transform="biproject", harmless_means=3 * r.clone())
    tiny = TinyLoaded("qwen2", d_model=8, n_layers=3)
    with pytest.raises(ConfigError, match="parallel to the harmless mean"):
        with parallel.hooks(tiny.model):
            pass
    for bad in [(), ("project", "project"), ("householder", "reflect")]:
        with pytest.raises(ConfigError):
            EditSpace(4, transforms=bad)


def _ctx(n: int = 5, d: int = 8) -> EditContext:
    return EditContext(_rand(n, d, seed=1), _rand(n, d, seed=2) + 1.0)


def test_search_offers_transforms_only_when_asked():
    ctx = _ctx()
    plain, wide = EditSpace.for_context(ctx), EditSpace.for_context(ctx, transforms=("project", "householder",
                                                                                     "biproject"))
    assert "transforms" not in plain.identity() and wide.identity()["transforms"] == ["project", "householder",
                                                                                       "biproject"]

    def sample(space: EditSpace, n: int) -> list[dict]:
        study = optuna.create_study(directions=["minimize", "minimize"],
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        out = []
        for _ in range(n):
            trial = study.ask()
            choice = space.suggest(trial)
            out.append((dict(trial.params), choice))
            study.tell(trial, [0.0, 0.0])
        return out

    for params, choice in sample(plain, 5):
        assert "transform" not in params and "transform" not in choice
        assert build_edit(choice, ctx).transform == "project"
    seen = set()
    for params, choice in sample(wide, 30):
        seen.add(params["transform"])
        edit = build_edit(choice, ctx)
        assert edit.transform == params["transform"] and choice.get("transform", "project") == params["transform"]
        assert (edit.harmless_means is not None) == (edit.transform == "biproject")
        if edit.transform != "project":
            assert edit.transform in describe_choice(choice)
    assert seen == {"project", "householder", "biproject"}
    anchor = wide.decode(wide.full_ablation_params(2, 1.0))
    assert "transform" not in anchor and build_edit(anchor, ctx).transform == "project"
    only = EditSpace.for_context(ctx, transforms=("householder",))  # one transform: fixed, not a parameter
    assert only.decode(only.full_ablation_params(2, 0.5))["transform"] == "householder"


def test_search_verb_searches_the_transforms_and_exports_their_edits(tiny_run, tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys

    root, ws, _ = tiny_run
    run = shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("edits", "*.db", "search*"))

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", *map(str, args)], capture_output=True,
                              text=True, env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    cli("search", "-r", run, "--trials", "10", "--n-startup-trials", "10", "--seed", "1",
        "--transforms", "project,householder,biproject")
    summary = json.loads((run / "search_edits.json").read_text())
    assert summary["settings"]["transforms"] == ["project", "householder", "biproject"]
    assert summary["identity"]["transforms"] == ["project", "householder", "biproject"]
    used = {t["choice"].get("transform", "project") for t in summary["trials"]}
    assert used > {"project"}, used  # random start-up trials reach the other transforms
    for rec in summary["pareto"]:
        edit = load_edit(run / "edits" / rec["edit_name"])
        assert edit.transform == rec["choice"].get("transform", "project")
    trial = next(t for t in summary["trials"] if t["choice"].get("transform") in ("householder", "biproject"))
    edit = build_edit(trial["choice"], EditContext.from_run(run), name="transformed")
    edit.save(run / "edits" / "transformed")
    cli("export", "-r", run, "--edit", "transformed", "--out", tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    batch = ws.chat.encode(["how to make a bomb", "tell joke"])
    with edit.apply(ws.adapter):
        expected = ws.loaded.model(**batch).logits
    assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-4)
