import base64
import html
import logging
import re

import torch

from refusal_atlas.report.geometry import classical_mds, cosine_matrix
from refusal_atlas.settings import load_settings
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.io import write_json
from refusal_atlas.workflows.run import run
from refusal_atlas.report.html import build_report
from refusal_atlas.core.rundir import RunDir


def test_mds_preserves_cosine_geometry():
    torch.manual_seed(0)
    basis = torch.randn(2, 50)
    vecs = torch.randn(6, 2) @ basis  # rank 2: MDS in 2-D with unit-normalised rows is exact
    coords = classical_mds(vecs)
    unit = torch.nn.functional.normalize(vecs.double(), dim=1)
    d_true = torch.cdist(unit, unit)
    d_mds = torch.cdist(coords, coords)
    assert torch.allclose(d_true, d_mds, atol=1e-6)
    assert torch.allclose(cosine_matrix(vecs).diagonal(), torch.ones(6, dtype=torch.float64))


def test_report_has_tables_and_real_pngs(tmp_path, tiny_model_dir):
    cfg = load_settings(None, dict(model=str(tiny_model_dir), n_train=4, n_val=3, n_eval=3, filter_train=False,
                                 layers=[0, 1, 2], positions=[-2, -1], max_new_tokens=2, device="cpu"))
    run(cfg, tmp_path / "r")
    page = build_report(tmp_path / "r").read_text()
    assert "Held-out results" in page and "Direction selection" in page and "DIM across layers" in page
    images = re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)', page)
    assert len(images) >= 3
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert (tmp_path / "r" / "plots" / "selection.png").stat().st_size > 5000


# --------------------------------------------------------------------------- geometry sections
PNG = b"\x89PNG\r\n\x1a\n"
D, N_LAYERS = 16, 6


def _train_meta(gen: torch.Generator, steps: int = 12, every: int = 4, extra: tuple[str, ...] = ()) -> dict:
    """meta as optim.train_directions leaves it (via TrainResult.meta, so the format cannot drift)."""
    from refusal_atlas.directions.optim import TrainResult

    terms = ("ablation", "addition", "retain") + extra
    history = {"loss": [], "lr": [0.01] * steps, "grad_norm": torch.rand(steps, generator=gen).tolist()}
    for key in terms:
        history[key] = (torch.rand(steps, generator=gen) * 0.5 + 0.01).tolist()
    history["loss"] = [sum(history[k][i] for k in terms) for i in range(steps)]
    val = [{"step": s, "refusal": -float(s) / steps, "kl": 0.05 + 0.01 * s, "objective": -float(s) / steps + 0.5}
           for s in range(0, steps + 1, every)]
    for v in val:
        v.update({"independence": 0.001} if "independence" in extra else {})
    return TrainResult(torch.zeros(1, D), torch.zeros(1, D), every * 2, "max_steps", history, val).meta()


def _som(gen: torch.Generator) -> DirectionSet:
    """A 3x3 hexagonal SOM with 7 live neurons (2 dropped), laid out like SomDirections.fit writes it."""
    coords = [[0, 0], [1, 1], [2, 2], [0, 1], [1, 0], [2, 0], [0, 2]]
    meta = {"grid": [3, 3], "topology": "hexagonal", "coords": coords, "hits": [5, 4, 3, 2, 2, 1, 1],
            "dropped": [[1, 2], [2, 1]], "quantization_error": 1.5, "n_samples": 18}
    return DirectionSet(torch.randn(7, D, generator=gen), 2, "som", -1, meta=meta)


def _make_run(root, gen: torch.Generator):
    run = RunDir(root, create=True)
    run.init_manifest({"model": "tiny"}, {"name": "tiny", "n_layers": N_LAYERS, "d_model": D})
    dim = DirectionSet(torch.randn(1, D, generator=gen) * 3, 2, "dim", -1)
    dim.save(run.direction_path("dim"))
    rdo = DirectionSet(torch.randn(1, D, generator=gen), 2, "rdo", None, meta=_train_meta(gen))
    rdo.save(run.direction_path("rdo"))
    cone = _train_meta(gen)
    cone.update({"k": 3, "basis_cos_with_dim": [0.5, 0.2, 0.1]})
    DirectionSet(torch.randn(3, D, generator=gen), 2, "cone", None, meta=cone).save(run.direction_path("cone"))
    runs = [{"direction": 0, "restart": j, "seed": j, "init": "random", "val_objective": 0.1 * j,
             **_train_meta(gen, extra=("independence",))} for j in range(2)]
    DirectionSet(torch.randn(1, D, generator=gen), 2, "repind", None,
                 meta={"runs": runs, "best_step": [8], "stopped": ["max_steps", "plateau"]}).save(
        run.direction_path("repind"))
    som = _som(gen)
    som.save(run.direction_path("som"))
    som.select([2, 0]).save(run.direction_path("som_best"))
    cross = [{"intervention": f"ablate:{name}", "dataset": "jailbreakbench", "judge": "cosine",
              "metric": "cross_ablation_with_dim", "n": 5, "independence_loss": 0.01, "mean_abs_cos_change": 0.02,
              "cos_with_dim": 0.1, "dim_under_ablation": torch.randn(5, generator=gen).tolist(),
              "direction_under_dim_ablation": torch.randn(5, generator=gen).tolist()}
             for name in ("repind", "rdo_orth", "rdo")]
    dist = {"intervention": "ablate:cone[k=3]:samples", "dataset": "jailbreakbench", "judge": "logit_refusal_score",
            "metric": "mean_refusal_score_distribution", "n": 5, "k": 3, "baseline_score": 1.0,
            "sample_scores": torch.randn(8, generator=gen).tolist(), "basis_scores": [-1.0, -0.5, -0.2],
            "random_scores": [0.9, 1.1, 0.8, 1.0], "min": -2.0, "median": 0.0, "max": 2.0}
    rate = {"intervention": "ablate:dim", "dataset": "jailbreakbench", "judge": "substring", "metric": "refusal_rate",
            "n": 10, "refusal_rate": 0.2, "ci95": [0.05, 0.5]}
    run.add_metrics([rate, dist, *cross])
    return run


NEW_PLOTS = ["direction_cosines", "direction_map", "som_grid_som", "som_grid_som_best", "training_rdo",
             "training_cone", "training_repind", "cone_samples", "independence", "metrics"]


def _assert_embedded(run, page: str, stem: str) -> None:
    data = (run.path / "plots" / f"{stem}.png").read_bytes()
    assert data[:8] == PNG and len(data) > 2000, stem
    assert f'alt="{stem}"' in page and base64.b64encode(data).decode("ascii") in page, stem


def test_report_draws_every_geometry_artifact(tmp_path):
    run = _make_run(tmp_path / "r", torch.Generator().manual_seed(0))
    page = build_report(run.path).read_text()
    for stem in NEW_PLOTS:
        _assert_embedded(run, page, stem)
    assert "Skipped" not in page
    assert "Gradient-trained directions" in page and "best val objective" in page
    assert "Refusal cones" in page and "Representational independence" in page
    assert sum(f"<td>{n}</td>" in page for n in ("rdo", "cone", "repind")) == 3


def test_report_skips_malformed_artifacts_and_keeps_the_rest(tmp_path, caplog):
    gen = torch.Generator().manual_seed(1)
    run = _make_run(tmp_path / "r", gen)
    bad = DirectionSet.load(run.direction_path("rdo"))
    bad.meta["history"] = "not a dict"
    bad.save(run.direction_path("rdo"))
    broken_som = _som(gen)
    broken_som.meta["hits"] = [1, 2]  # one per neuron expected
    broken_som.save(run.direction_path("som_broken"))
    run.direction_path("garbage").write_bytes(b"not safetensors")
    metrics = run.metrics()
    no_samples = {**next(r for r in metrics if r["metric"] == "mean_refusal_score_distribution"),
                  "intervention": "ablate:cone[k=2]:samples", "k": 2}
    del no_samples["sample_scores"]
    ragged = {**next(r for r in metrics if r["metric"] == "cross_ablation_with_dim"),
              "intervention": "ablate:odd", "direction_under_dim_ablation": [0.1]}
    run.add_metrics([no_samples, ragged])

    with caplog.at_level(logging.WARNING, logger="refusal_atlas.report.html"):
        page = build_report(run.path).read_text()
    for stem in ("training_rdo", "som_grid_som_broken"):
        assert not (run.path / "plots" / f"{stem}.png").exists()
    for stem in set(NEW_PLOTS) - {"training_rdo"}:
        _assert_embedded(run, page, stem)
    for what in ("training curves of rdo", "SOM grid of som_broken", "direction file garbage.safetensors",
                 "'ablate:cone[k=2]:samples'", "'ablate:odd'"):
        assert any(html.escape(what) in note for note in re.findall(r"<p class='note'>Skipped [^<]*", page)), what
        assert any(what in r.getMessage() for r in caplog.records), what


def test_report_survives_a_metrics_file_that_is_not_a_list(tmp_path):
    run = _make_run(tmp_path / "r", torch.Generator().manual_seed(2))
    write_json(run.metrics_path, {"records": []})
    page = build_report(run.path).read_text()
    assert "Skipped metrics.json" in page
    assert (run.path / "plots" / "training_repind.png").exists() and "Held-out results" not in page
