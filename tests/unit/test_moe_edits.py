"""Expert-granular layer-wise edits and router suppression on mixture-of-experts blocks: hooks equal weights for
every transform and flag on the random-weight Qwen2-MoE (shared expert, one dense layer), Qwen3-MoE and Mixtral
and on per-expert / transposed layouts; every expert is edited; the router stops reading the direction; weights
are restored bit for bit and hooks leave nothing behind; save/load and safetensors export round-trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.edits import LayerwiseAblation, StrengthKernel, load_edit
from refusal_atlas.export.formats import export_model
from refusal_atlas.model import ChatFormatter, ModelAdapter
from tiny import PROMPTS_MOE, tiny_list_moe_model, tiny_model, tiny_moe_model, tiny_tokenizer

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral"]
KA, KM = StrengthKernel(1.1, 2.0, 0.4, 2.0), StrengthKernel(0.9, 1.0, 0.5, 3.0)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _edits(n: int, d: int) -> dict[str, LayerwiseAblation]:
    per_layer, subset, means = _rand(n, 1, d, seed=2), _rand(2, d, seed=3).expand(n, 2, d), _rand(n, d, seed=4) + 2
    return {
        "project": LayerwiseAblation.from_kernels(per_layer, KA, KM),
        "project-norm": LayerwiseAblation.from_kernels(per_layer, KA, KM, norm_preserving=True),
        "householder-sequential": LayerwiseAblation.from_kernels(subset, KA, KM, transform="householder",
                                                                 mode="sequential", embed_weight=0.5),
        "householder-norm": LayerwiseAblation.from_kernels(per_layer, KA, KM, transform="householder",
                                                           norm_preserving=True),
        "biproject-norm": LayerwiseAblation.from_kernels(subset, KA, KM, transform="biproject", harmless_means=means,
                                                         norm_preserving=True),
        "router": LayerwiseAblation.from_kernels(per_layer, KA, KM, router_weight=1.0),
        "router-only": LayerwiseAblation(per_layer, [0.0] * n, [0.0] * n, router_weight=0.7),
        "router-norm-biproject": LayerwiseAblation.from_kernels(per_layer, KA, KM, router_weight=0.5, transform="biproject",
                                                                harmless_means=means, norm_preserving=True),
    }


def _check_hooks_equal_weights(model, edits):
    adapter, chat = ModelAdapter(model), ChatFormatter(tiny_tokenizer())
    batch = chat.encode(PROMPTS_MOE)
    clean = model(**batch).logits
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = {name: type(m) for name, m in model.named_modules()}
    for name, edit in edits.items():
        assert edit.evaluated_form == "hooks", name
        with edit.hooks(adapter):
            hooked = model(**batch).logits
        assert {n: type(m) for n, m in model.named_modules()} == modules, name  # no parametrization left behind
        with edit.weights(adapter) as report:
            weighted = model(**batch).logits
        assert torch.allclose(hooked, weighted, atol=1e-4), (name, (hooked - weighted).abs().max())
        assert not torch.allclose(hooked, clean, atol=1e-3), name
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), name  # bit-identical restore
        assert report["routers"] == (sum(adapter.is_moe(j) for j in range(adapter.n_layers))
                                     if edit.router_weight else 0), name
    assert torch.equal(model(**batch).logits, clean)


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_layerwise_hooks_equal_weights_for_every_transform_and_router(arch):
    model = tiny_moe_model(arch)
    _check_hooks_equal_weights(model, _edits(model.config.num_hidden_layers, model.config.hidden_size))


@pytest.mark.parametrize("fused_transposed", [False, True])
def test_per_expert_and_transposed_layouts_hooks_equal_weights(fused_transposed):
    model = tiny_list_moe_model(fused_transposed)  # per-expert Linear layers (with biases), or [E, inter, d] + bias
    edits = _edits(model.config.num_hidden_layers, model.config.hidden_size)
    _check_hooks_equal_weights(model, {k: edits[k] for k in ("project-norm", "householder-sequential", "router")})


def _down_projs(layer) -> list[torch.Tensor]:
    """[E, d, inter] write matrices of a block's experts (+ the shared expert's as [1, d, inter])."""
    out = [layer.mlp.experts.down_proj]
    if getattr(layer.mlp, "shared_expert", None) is not None:
        out.append(layer.mlp.shared_expert.down_proj.weight.unsqueeze(0))
    return out


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_every_expert_and_the_shared_expert_is_edited_norms_kept_per_expert(arch):
    model = tiny_moe_model(arch)
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    u = _rand(d, seed=5)
    u = u / u.norm()
    moe = [j for j in range(n) if ModelAdapter(model).is_moe(j)]
    before = [[w.clone() for w in _down_projs(model.model.layers[j])] for j in moe]
    LayerwiseAblation(u.expand(n, 1, d), [0.0] * n, [1.0] * n, norm_preserving=True).apply_weights(model)
    for j, old in zip(moe, before):
        for w, w0 in zip(_down_projs(model.model.layers[j]), old):
            # every write vector (expert e, input feature i) lost its component along u and kept its norm
            assert torch.einsum("d,edi->ei", u, w).abs().max() < 1e-5
            assert torch.allclose(w.norm(dim=1), w0.norm(dim=1), rtol=1e-5)
            assert not torch.allclose(w, w0)
    if arch == "qwen2_moe":  # layer 1 is a dense MLP: edited as before
        dense = model.model.layers[1].mlp.down_proj.weight
        assert (u @ dense).abs().max() < 1e-5


def test_router_suppression_stops_the_router_reading_the_direction():
    model = tiny_moe_model("qwen3_moe")
    adapter = ModelAdapter(model)
    n, d = adapter.n_layers, adapter.d_model
    u = _rand(d, seed=6)
    u = u / u.norm()
    edit = LayerwiseAblation(u.expand(n, 1, d), [0.0] * n, [0.0] * n, router_weight=1.0)
    x = _rand(5, d, seed=7)
    router = adapter.router(2)
    plain = router(x)[0]
    assert not torch.allclose(router(x + 3 * u)[0], plain, atol=1e-3)  # the direction moves the logits...
    with edit.hooks(adapter):
        hooked = router(x + 3 * u)[0]
        assert torch.allclose(hooked, router(x)[0], atol=1e-5)  # ...and no longer under suppression
    with edit.weights(adapter):
        assert (router.weight @ u).abs().max() < 1e-5  # w_e ← w_e − (w_e·u) u for every expert
        assert torch.allclose(router(x + 3 * u)[0], hooked, atol=1e-5)
    half = LayerwiseAblation(u.expand(n, 1, d), [0.0] * n, [0.0] * n, router_weight=0.5)
    # strength s removes the fraction s of each row's component along u
    w0 = (router.weight @ u).clone()
    with half.weights(adapter):
        assert torch.allclose(router.weight @ u, 0.5 * w0, atol=1e-6)


def test_router_and_moe_bad_input():
    n, d = 4, 32
    with pytest.raises(ConfigError, match="router suppression weight must be finite and >= 0"):
        LayerwiseAblation(_rand(n, 1, d), [1.0] * n, [1.0] * n, router_weight=-0.1)
    with pytest.raises(ConfigError, match="router suppression weight"):
        LayerwiseAblation(_rand(n, 1, d), [1.0] * n, [1.0] * n, router_weight=float("nan"))
    dense = ModelAdapter(tiny_model("qwen2"))
    edit = LayerwiseAblation(_rand(n, 1, d), [1.0] * n, [1.0] * n, router_weight=1.0)
    for use in (edit.hooks, edit.weights, edit.apply_weights):
        with pytest.raises(ModelError, match="router suppression .* needs mixture-of-experts blocks; qwen2 has none"):
            ctx = use(dense)
            with ctx:
                pass
    with pytest.raises(ModelError, match="no mixture-of-experts router"):
        dense.router(0)


def test_save_load_and_safetensors_export_round_trip(tmp_path):
    model = tiny_moe_model("qwen2_moe")
    adapter, tok = ModelAdapter(model), tiny_tokenizer()
    batch = ChatFormatter(tok).encode(PROMPTS_MOE)
    edit = _edits(adapter.n_layers, adapter.d_model)["router-norm-biproject"]
    plain = LayerwiseAblation.from_kernels(_rand(adapter.n_layers, 1, adapter.d_model), KA, KM)
    assert "router_weight" not in plain.spec() and edit.spec()["router_weight"] == 0.5  # off: spec as before
    edit.save(tmp_path / "moe_edit")
    loaded_edit = load_edit(tmp_path / "moe_edit")
    assert loaded_edit.fingerprint() == edit.fingerprint() and loaded_edit.router_weight == 0.5
    with edit.hooks(adapter):
        expected = model(**batch).logits
    with loaded_edit.hooks(adapter):
        assert torch.allclose(model(**batch).logits, expected, atol=1e-6)

    class Loaded:
        name, source, info = "tiny-qwen2_moe", "test", {}

    Loaded.model, Loaded.tokenizer = model, tok
    summary = export_model(Loaded(), loaded_edit.apply_weights, tmp_path / "out")
    assert summary["edit"]["routers"] == 3 and summary["edit"]["norm_preserving"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-4)


def test_search_space_offers_router_suppression_only_when_asked():
    import optuna

    from refusal_atlas.search.edit_space import EditSpace, build_edit, describe_choice
    from refusal_atlas.search.sources import EditContext

    n, d = 4, 32
    ctx = EditContext(_rand(n, d, seed=8), _rand(n, d, seed=9) + 2, {})
    plain, routed = EditSpace.for_context(ctx), EditSpace.for_context(ctx, router=True)
    assert "router" not in plain.identity() and routed.identity()["router"] is True  # plain studies resume unchanged
    params = {}
    for space in (plain, routed):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        trial = study.ask()
        choice = space.suggest(trial)
        params[space.router] = trial.params
        assert ("router" in choice) == space.router and ("router_weight" in trial.params) == space.router
    choice = routed.decode({**params[True], "router_weight": 0.4})
    edit = build_edit(choice, ctx)
    assert choice["router"] == 0.4 and edit.router_weight == 0.4 and "router 0.40" in describe_choice(choice)
    assert build_edit(plain.decode(params[False]), ctx).router_weight == 0.0
    anchor = routed.decode(routed.full_ablation_params(2))
    assert anchor["router"] == 0.0 and build_edit(anchor, ctx).router_weight == 0.0  # trial 0 stays full DIM ablation


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A run directory (activations, DIM at layer 2) on the tiny Qwen2-MoE saved to disk."""
    from refusal_atlas.model.saving import save_model_dir
    from refusal_atlas.settings import load_settings
    from refusal_atlas.workflows.run import dim_step, extract_step, select_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    root = tmp_path_factory.mktemp("moe_run")
    save_model_dir(tiny_moe_model("qwen2_moe"), tiny_tokenizer(), root / "model")
    cfg = load_settings(None, dict(model=str(root / "model"), device="cpu", n_train=16, n_val=4, n_eval=4,
                                   max_new_tokens=2, filter_train=False, layer=2))
    ws = open_workspace(cfg, root / "run")
    sets = load_prompt_sets(cfg)
    select_step(ws, dim_step(ws.run, extract_step(ws, sets)), sets)
    return root, ws


def test_search_edits_searches_expert_and_router_edits_on_a_moe_run(moe_run, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from refusal_atlas.workflows.validate import check_model

    root, ws = moe_run
    run = root / "run"
    assert check_model(str(root / "model")).n_experts == 4  # what lets --router through, read from config.json
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "search", "-r", str(run), "--trials", "8",
                           "--n-startup-trials", "2", "--router", "--verify", "0"],
                          capture_output=True, text=True, env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "search_edits.json").read_text())
    trials = [t for t in summary["trials"] if t.get("choice")]
    assert summary["identity"]["router"] is True and len(trials) == 8  # 6 anchors (router off), then sampled
    assert all("router" in t["choice"] for t in trials)
    assert any(t["choice"]["router"] > 0 and t["choice"]["mlp"]["peak"] > 0 for t in trials)
    best = load_edit(run / "edits" / "search_best")
    assert best.fingerprint() == summary["chosen"]["edit_fingerprint"]
    batch = ws.chat.encode(PROMPTS_MOE)
    with best.hooks(ws.adapter):
        hooked = ws.loaded.model(**batch).logits
    with best.weights(ws.adapter):
        assert torch.allclose(ws.loaded.model(**batch).logits, hooked, atol=1e-4)
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "export", "-r", str(run), "--edit", "search_best",
                           "--out", str(tmp_path / "model")], capture_output=True, text=True,
                          env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert torch.allclose(reloaded(**batch).logits, hooked, atol=1e-4)


def test_reparametrizations_nest_and_leave_the_same_parameter_behind():
    """Hooks.reparametrize (the norm-preserving hook of fused experts): nested groups remove only their own, and the
    module gets its own class and parameter object back, also after an error inside the block."""
    from refusal_atlas.model.hooks import Hooks

    lin = torch.nn.Linear(3, 2)
    w, x = lin.weight, _rand(4, 3)
    y0 = lin(x)
    with Hooks().reparametrize(lin, "weight", lambda t: 2 * t):
        with Hooks().reparametrize(lin, "weight", lambda t: 3 * t):
            assert torch.allclose(lin(x) - lin.bias, 6 * (y0 - lin.bias), atol=1e-6)
        assert torch.allclose(lin(x) - lin.bias, 2 * (y0 - lin.bias), atol=1e-6)
    assert lin.weight is w and type(lin) is torch.nn.Linear and torch.equal(lin(x), y0)
    with pytest.raises(RuntimeError, match="inside"):
        with Hooks().reparametrize(lin, "weight", lambda t: 0 * t):
            raise RuntimeError("inside")
    assert lin.weight is w and type(lin) is torch.nn.Linear and torch.equal(lin(x), y0)
