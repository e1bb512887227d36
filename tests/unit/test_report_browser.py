"""The report explains itself: labelled plots, provenance, examples, and it renders in a real browser."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from refusal_atlas.report import plots
from refusal_atlas.settings import load_settings
from refusal_atlas.workflows.run import run
from refusal_atlas.report.html import build_report
from refusal_atlas.report.sections import comparison_section, provenance_section
from refusal_atlas.core.rundir import RunDir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("report") / "r"
    cfg = load_settings(None, dict(model=str(tiny_model_dir), n_train=4, n_val=3, n_eval=3, filter_train=False,
                                 layers=[0, 1, 2, 3], positions=[-2, -1], max_new_tokens=3, device="cpu",
                                 prune_layer_frac=0.25))
    run(cfg, root)
    return root


def test_layer_zero_dim_vector_is_masked_not_zero():
    vecs = torch.randn(4, 8)
    vecs[0] = 0
    cos = plots.masked_cosines(vecs)
    assert np.isnan(cos[0]).all() and np.isnan(cos[:, 0]).all()
    assert np.allclose(np.diag(cos)[1:], 1.0) and not np.isnan(cos[1:, 1:]).any()


def test_selection_plot_marks_filters_thresholds_and_baseline():
    cands = [{"position": -1, "layer": 1, "refusal": -1.0, "kl": 0.5, "steering": 1.0, "status": "filtered:kl"},
             {"position": -1, "layer": 2, "refusal": -0.5, "kl": 0.01, "steering": -2.0, "status": "filtered:induce"},
             {"position": -1, "layer": 3, "refusal": 0.2, "kl": 0.02, "steering": 0.5, "status": "ok"},
             {"position": -1, "layer": 4, "status": "filtered:late_layer"}]
    fig = plots.selection_figure(cands, cands[2], baseline={"harmful_refusal_score": 2.0,
                                                            "harmless_refusal_score": -3.0},
                                 kl_threshold=0.1, induce_threshold=0.0, n_val=3)
    legends = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    for text in ("filtered: KL > threshold", "filtered: cannot induce refusal", "passed the filters",
                 "KL threshold", "induce threshold", "baseline (harmful val, no edit)",
                 "pruned late layers ≥ 4 (not scored)", "chosen: layer 3, position -1"):
        assert text in legends, text
    assert all(ax.get_ylabel() and ax.get_xlabel() and ax.get_title() for ax in fig.axes)
    assert "n = 3 harmful" in fig._suptitle.get_text()
    kl_ax = fig.axes[1]
    assert any(np.allclose(line.get_ydata(), 0.1) for line in kl_ax.get_lines())  # threshold drawn at its value
    plots.close_all()


def test_provenance_reads_counts_from_the_manifest_and_activations(tiny_run):
    r = RunDir(tiny_run)
    manifest = r.manifest()
    assert manifest["train_counts"] == {"harmful": {"sampled": 4, "kept": 4}, "harmless": {"sampled": 4, "kept": 4}}
    manifest["train_counts"]["harmful"] = {"sampled": 128, "kept": 41}
    manifest["config"]["data"]["filter_train"] = True
    text = provenance_section(r, manifest, r.metrics())
    assert "harmful 41 of 128" in text and "kept by the refusal filter" in text
    del manifest["train_counts"]  # older runs: the kept count comes from the activation file's header
    assert "harmful 4 of 4" in provenance_section(r, manifest, r.metrics())
    for text_piece in ("max_new_tokens 3", "jailbreakbench n=3", "seed", "torch", "extract", "KL(P_base"):
        assert text_piece in text, text_piece


def test_comparison_table_prefers_compare_json(tmp_path):
    r = RunDir(tmp_path, create=True)
    rows = [{"intervention": "none", "refusal_rate": 0.5, "ci95": [0.4, 0.6], "dataset": "d", "n": 10},
            {"intervention": "ablate:dim", "refusal_rate": 0.1, "ci95": [0.05, 0.2], "dataset": "d", "n": 10},
            {"intervention": "ablate:som_best", "refusal_rate": 0.05, "ci95": [0.01, 0.1], "dataset": "d", "n": 10}]
    pivot = comparison_section(r, rows)
    assert "ablate:som_best" in pivot and "0.05 [0.01, 0.10] n=10" in pivot
    assert comparison_section(r, rows[:2]) == ""  # one method: the held-out table says it all
    (tmp_path / "compare.json").write_text(json.dumps({"rows": [{"method": "rdo", "refusal": 0.07}]}))
    assert "compare.json" in comparison_section(r, rows) and "<td>rdo</td>" in comparison_section(r, rows)


def test_report_page_explains_itself(tiny_run):
    page = build_report(tiny_run).read_text()
    for heading in ("Definitions", "How this run was made", "Example completions", "Direction selection"):
        assert f"<h2>{heading}" in page, heading
    assert "log-odds" in page and "<details>" in page and "Content warning" in page
    assert "Skipped" not in page
    examples = page[page.index("Example completions"):page.index("</details>")]
    assert "<th>none</th>" in examples and "<th>ablate:dim</th>" in examples


def _chromium(*args: str, tmp_path) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = build_report(tiny_run).read_text()
    n_images = len(re.findall(r"<img ", page))
    assert n_images >= 3
    # a copy with a probe script: after load, each image's natural size is written into the DOM
    probe = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='probe';"
             "p.textContent=JSON.stringify([...document.images].map(i=>[i.complete,i.naturalWidth,i.naturalHeight]));"
             "document.body.appendChild(p);});</script></body>")
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", probe))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), tmp_path=tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(sizes) == n_images
    assert all(done and w > 100 and h > 100 for done, w, h in sizes), sizes

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,3000", (tiny_run / "report.html").as_uri(),
              tmp_path=tmp_path)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05  # not a blank page
    rows_with_ink = (pixels.min(axis=(1, 2)) < 0.5).mean()
    assert rows_with_ink > 0.3, rows_with_ink  # text and plots down the page, not one line at the top
