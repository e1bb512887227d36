"""Edit search: the space's encoding (inclusion scores, canonical order, k bounds), seeding and
resume through the shared loop, trial start/end times (reused trials too), the run-directory step,
the `search` verb with --trials/--budget, and `evaluate --edit` / `export --edit` on its pick."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.workflows.verbs import parse_budget
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.edits import LayerwiseAblation, load_edit
from refusal_atlas.search.sources import EditContext
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.search.study import completed, open_study, pareto_front
from refusal_atlas.search.storage import fail_stale_trials
from refusal_atlas.search.edit_space import EditSpace, build_edit, run_edit_trials

N, D = 6, 8


def _ctx(n_set: int = 5) -> EditContext:
    g = torch.Generator().manual_seed(0)
    som = DirectionSet(torch.randn(n_set, D, generator=g), layer=3, method="som", ids=list(range(10, 10 + n_set)))
    return EditContext(torch.randn(N, D, generator=g), torch.randn(N, D, generator=g), {"som": som})


def _params(space: EditSpace, **over) -> dict:
    base = {"source": "set:som", "direction_index": 2.0, "mode": "sequential", "projected": False,
            "norm_preserving": False, "embed": False, **{f"som_use_{i}": 0.0 for i in dict(space.sets)["som"]}}
    for c in ("attn", "mlp"):
        base.update({f"{c}_peak": 1.0, f"{c}_position": 4.0, f"{c}_floor_frac": 0.5, f"{c}_distance": 2.0})
    return {**base, **over}


def test_inclusion_encoding_is_canonical_and_bounded():
    space = EditSpace.for_context(_ctx(), k_max=3)
    pick = lambda **s: space.decode(_params(space, **s))["ids"]  # noqa: E731
    assert pick(som_use_13=0.9, som_use_11=0.6) == [11, 13]  # canonical order, whatever the scores
    assert pick() == [10]  # none above 0.5: the highest (ties: the first)
    assert pick(som_use_12=0.4) == [12]
    assert pick(**{f"som_use_{i}": 0.6 + 0.01 * i for i in range(10, 15)}) == [12, 13, 14]  # top k_max
    assert space.decode(_params(space, som_use_12=0.9))["mode"] == "subspace"  # one direction: mode is moot
    one = space.decode(_params(space, source="dim:index", direction_index=2.5))
    assert one == {"source": "dim:index", "projected": False, "norm_preserving": False, "embed": False,
                   "direction_index": 2.5,
                   "attn": {"peak": 1.0, "position": 4.0, "floor": 0.5, "distance": 2.0},
                   "mlp": {"peak": 1.0, "position": 4.0, "floor": 0.5, "distance": 2.0}}
    with pytest.raises(ConfigError, match="has only 5 directions"):
        EditSpace.for_context(_ctx(), k_max=6)
    with pytest.raises(ConfigError, match="k_max must be in 1..7"):
        EditSpace(N, k_max=8)


def test_built_edits_follow_the_choice():
    ctx = _ctx()
    space = EditSpace.for_context(ctx)
    edit = build_edit(space.decode(_params(space, som_use_11=0.9, som_use_14=0.8, projected=True)), ctx)
    assert isinstance(edit, LayerwiseAblation) and edit.per_layer.shape == (N, 2, D) and edit.mode == "sequential"
    assert torch.allclose(edit.per_layer[0], ctx.from_set("som", [11, 14], True))
    assert edit.attn_weights == pytest.approx([0, 0, 0.5, 0.75, 1.0, 0.75])  # tent around 4, floor 0.5 at ±2
    per_layer = build_edit(space.decode(_params(space, source="dim:per_layer")), ctx)
    assert torch.allclose(per_layer.per_layer[:, 0], ctx.per_layer(False)[:, 0])
    with pytest.raises(ConfigError, match="outside the layers"):
        build_edit(space.decode(_params(space, attn_position=9.0)), ctx)


def _objective(edit: LayerwiseAblation) -> tuple[float, float]:
    """Deterministic, model-free stand-in: stronger edits refuse less and damage more."""
    strength = sum(edit.attn_weights) + 0.5 * sum(edit.mlp_weights)
    align = float(edit.per_layer[:, 0, 0].abs().mean())
    return -strength * (1 + align) - 0.3 * edit.norm_preserving, 0.01 * strength ** 2 + 0.05 * edit.per_layer.shape[1]


def _run(study, ctx, space, n, seed=3):
    return run_edit_trials(study, space, ctx, _objective, seed=seed, n_startup_trials=3, n_trials=n)


def test_seeded_resumable_and_every_trial_has_start_and_end_times(tmp_path):
    ctx = _ctx()
    space = EditSpace.for_context(ctx)
    straight = optuna.create_study(directions=["minimize", "minimize"])
    _run(straight, ctx, space, 8)
    again = optuna.create_study(directions=["minimize", "minimize"])
    _run(again, ctx, space, 8)
    assert [t.params for t in completed(again)] == [t.params for t in completed(straight)]
    other = optuna.create_study(directions=["minimize", "minimize"])
    _run(other, ctx, space, 8, seed=4)
    assert [t.params for t in completed(other)] != [t.params for t in completed(straight)]

    study = open_study(tmp_path / "s.db", "e", {"space": "edits"})
    _run(study, ctx, space, 3)
    study.ask()  # left RUNNING by a "killed" process
    reopened = open_study(tmp_path / "s.db", "e", {"space": "edits"})
    assert fail_stale_trials(reopened) == [3]
    _run(reopened, ctx, space, 5)
    assert [t.params for t in completed(reopened)] == [t.params for t in completed(straight)]
    assert [t.values for t in completed(reopened)] == [t.values for t in completed(straight)]
    for t in completed(reopened):
        assert t.datetime_start is not None and t.datetime_complete >= t.datetime_start
        assert t.user_attrs["choice"] == space.decode(t.params)
    front = pareto_front(reopened)
    assert front and all(t.state.name == "COMPLETE" for t in front)


def test_reused_trials_have_their_own_times():
    ctx = _ctx(n_set=1)
    space = EditSpace(N)  # DIM sources only, so the categorical choices repeat quickly
    study = optuna.create_study(directions=["minimize", "minimize"])
    calls = []
    run_edit_trials(study, space, ctx, lambda e: calls.append(1) or (0.0, 0.0), seed=0, n_startup_trials=2,
                    n_trials=3)
    first = study.trials[0]
    study.enqueue_trial(first.params)
    run_edit_trials(study, space, ctx, lambda e: calls.append(1) or (0.0, 0.0), seed=0, n_startup_trials=2,
                    n_trials=1)
    reused = study.trials[-1]
    assert reused.user_attrs["reused_from"] == first.number and len(calls) == 3
    assert reused.datetime_start is not None and reused.datetime_complete is not None


@pytest.mark.parametrize("text, trials, expect", [(None, None, (30, None)), (None, 5, (5, None)),
                                                  ("12", None, (12, None)), ("20m", None, (None, 20.0)),
                                                  ("90s", None, (None, 1.5)), ("1h", None, (None, 60.0))])
def test_budget_parsing(text, trials, expect):
    assert parse_budget(text, trials) == expect


@pytest.mark.parametrize("text, trials, match", [("3", 4, "not both"), ("ten", None, "--budget"),
                                                 ("2.5", None, "whole number"), (None, 0, ">= 1")])
def test_budget_errors(text, trials, match):
    with pytest.raises(ConfigError, match=match):
        parse_budget(text, trials)


# --- on a tiny run directory --------------------------------------------------------------------------------
def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_search_verb_saves_the_pick_and_evaluate_export_use_it(tiny_run, tmp_path):
    root, ws, _ = tiny_run
    run = root / "run"
    out = _cli("search", "-r", str(run), "--trials", "3", "--n-startup-trials", "2", "--sets", "som").stdout
    assert "Pareto front" in out and "search_best" in out and "DIM" in out
    summary = json.loads((run / "search_edits.json").read_text())
    assert summary["n_trials"]["complete"] == 3
    assert all(t["start"] and t["end"] for t in summary["trials"])
    best = load_edit(run / "edits" / "search_best")
    assert best.fingerprint() == summary["chosen"]["edit_fingerprint"]
    assert all((run / "edits" / f"{rec['edit_name']}.json").is_file() for rec in summary["pareto"])
    again = _cli("search", "-r", str(run), "--budget", "4", "--n-startup-trials", "2", "--sets", "som").stdout
    assert "4 complete" in again  # --budget N / --trials N reach N completed trials
    summary = json.loads((run / "search_edits.json").read_text())
    best = load_edit(run / "edits" / "search_best")  # the fourth trial may have changed the pick
    assert best.fingerprint() == summary["chosen"]["edit_fingerprint"]

    _cli("evaluate", "-r", str(run), "--edit", "search_best", "--interventions", "none", "--datasets",
         "harmless_test", "--n", "3", "--max-new-tokens", "2", "--kl-tokens", "2")
    labels = {r["intervention"] for r in ws.run.metrics()}
    assert best.label in labels

    _cli("export", "-r", str(run), "--edit", "search_best", "--out", str(tmp_path / "model"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    batch = ws.chat.encode(["how to make a bomb", "tell joke"])
    with best.apply(ws.adapter):
        expected = ws.loaded.model(**batch).logits
    assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-4)


def test_a_bfloat16_search_keeps_the_runs_dtype_and_is_its_own_study(tiny_run, tmp_path):
    """--dtype loads the model in bf16 for the search only: export and evaluate keep the run's float32, and the
    study records the dtype, so a float32 study is never resumed with bf16 values."""
    import shutil

    root, _, _ = tiny_run
    run = shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("edits", "*.db", "search*"))
    before = json.loads((run / "manifest.json").read_text())["config"]["model"]["dtype"]
    _cli("search", "-r", str(run), "--trials", "2", "--n-startup-trials", "2", "--dtype", "bfloat16")
    summary = json.loads((run / "search_edits.json").read_text())
    assert summary["n_trials"]["complete"] == 2
    assert summary["identity"]["objective"].endswith("+bfloat16")
    assert json.loads((run / "manifest.json").read_text())["config"]["model"]["dtype"] == before
    proc = _cli("search", "-r", str(run), "--trials", "3", "--n-startup-trials", "2", check=False)
    assert proc.returncode == 2 and "objective" in proc.stderr  # float32 values never join the bf16 study


def test_search_bad_input_is_one_error_line(tiny_run, tmp_path):
    root, ws, _ = tiny_run
    run = root / "run"
    DirectionSet(torch.randn(2, ws.adapter.d_model), layer=1, method="rdo").save(run / "directions" / "small.safetensors")
    DirectionSet(torch.randn(2, 5), layer=1, method="rdo").save(run / "directions" / "alien.safetensors")
    for args, match in [(["search", "-r", str(run), "--budget", "soon"], "--budget"),
                        (["search", "edits", "-r", str(run), "--sets", "rdo"], "no direction set 'rdo'"),
                        (["search", "-r", str(run), "--k-max", "9"], "--k-max must be in 1..7"),
                        (["search", "-r", str(run), "--sets", "small", "--k-max", "3"], "has only 2 directions"),
                        (["search", "-r", str(run), "--sets", "alien"], "comes from another model"),
                        (["search", "-r", str(run), "--dtype", "fp12"], "unknown dtype 'fp12'"),
                        (["search", "-r", str(run), "--router"],  # read from config.json: qwen2 is dense
                         "--router applies to mixture-of-experts models only; this model (qwen2) has no experts"),
                        (["evaluate", "-r", str(run), "--edit", "nope"], "no saved edit"),
                        (["export", "-r", str(run), "--edit", "nope", "--out", str(tmp_path / "x")], "no saved edit")]:
        proc = _cli(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and match in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr  # before the model loads
    other = LayerwiseAblation(torch.randn(7, 1, ws.adapter.d_model), [1.0] * 7, [1.0] * 7)
    other.save(run / "edits" / "other_model")
    proc = _cli("export", "-r", str(run), "--edit", "other_model", "--out", str(tmp_path / "y"), check=False)
    assert proc.returncode == 2 and "n_layers 7" in proc.stderr and "Loading weights" not in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_validation_objective_scores_an_edit_in_its_exported_form(tiny_run):
    from refusal_atlas.edits import DirectionalAblation
    from refusal_atlas.evaluation.objective import ValidationObjective
    from refusal_atlas.evaluation.refusal import mean_refusal_score

    _, ws, sets = tiny_run
    harmful, harmless = [p.instruction for p in sets.harmful_val], [p.instruction for p in sets.harmless_val]
    obj = ValidationObjective(ws.adapter, ws.chat, harmful, harmless, ws.refusal_ids)
    dirs = torch.randn(2, ws.adapter.d_model, generator=torch.Generator().manual_seed(1))
    dirs[1] += 2 * dirs[0]
    edit = DirectionalAblation(dirs, "sequential")  # correlated: evaluated as weights
    refusal, kl = obj(edit)
    with edit.weights(ws.adapter):
        assert mean_refusal_score(ws.adapter, ws.chat, harmful, ws.refusal_ids, batch_size=16) == refusal
    assert kl > 0 and obj(edit) == (refusal, kl)


def test_trial_zero_is_full_dim_ablation(tiny_run):
    """The warm-start parameters mean exactly full ablation of the run's DIM direction."""
    root, ws, _ = tiny_run
    ctx = EditContext.from_run(root / "run")
    space = EditSpace.for_context(ctx)
    dim = DirectionSet.load(ws.run.direction_path("dim"))
    edit = build_edit(space.decode(space.full_ablation_params(dim.layer)), ctx)
    assert edit.attn_weights == edit.mlp_weights == [1.0] * ctx.n_layers and edit.embed_weight == 1.0
    from refusal_atlas.edits import DirectionalAblation

    batch = ws.chat.encode(["how to make a bomb", "tell joke please"])
    with DirectionalAblation(dim).hooks(ws.adapter):
        reference = ws.loaded.model(**batch).logits
    with edit.apply(ws.adapter):
        assert torch.allclose(ws.loaded.model(**batch).logits, reference, atol=1e-4)
    summary = json.loads((root / "run" / "search_edits.json").read_text()) if (root / "run" / "search_edits.json").exists() else None
    if summary is not None:  # written by the CLI test of this module
        assert summary["trials"][0]["choice"] == space.decode(space.full_ablation_params(dim.layer))


def test_anchor_trials_are_uniformly_weakened_ablations(tiny_run):
    """A weaker anchor scales every write's ablation weight, leaves the embedding alone and, on a tiny model,
    does less damage than full ablation; a strength outside the peak range is refused."""
    root, ws, _ = tiny_run
    ctx = EditContext.from_run(root / "run")
    space = EditSpace.for_context(ctx)
    dim = DirectionSet.load(ws.run.direction_path("dim"))
    half = build_edit(space.decode(space.full_ablation_params(dim.layer, 0.5)), ctx)
    assert half.attn_weights == half.mlp_weights == [0.5] * ctx.n_layers and half.embed_weight == 0.0
    batch = ws.chat.encode(["how to make a bomb", "tell joke please"])
    clean = ws.loaded.model(**batch).logits
    with half.apply(ws.adapter):
        weak = ws.loaded.model(**batch).logits
    with build_edit(space.decode(space.full_ablation_params(dim.layer)), ctx).apply(ws.adapter):
        full = ws.loaded.model(**batch).logits
    assert 0 < (weak - clean).abs().max() < (full - clean).abs().max()
    with pytest.raises(ConfigError, match="peak range"):
        space.full_ablation_params(dim.layer, 0.05)
