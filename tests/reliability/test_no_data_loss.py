"""No data loss and models that do not fit: the checks behind the bad-input cases, on tiny models."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_atlas.settings import load_settings
from refusal_atlas.data import load_prompts
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.rundir import RunDir
from refusal_atlas.workflows.validate import SELECTION_SETTINGS, check_run_settings
from tiny import TinyLoaded

# a tiny model's run: no refusal filter, fixed thresholds that every candidate passes
TINY_RUN = dict(n_train=6, n_val=4, n_eval=4, filter_train=False, layers=[0, 1], positions=[-1], max_new_tokens=3,
                kl_threshold=1e9, induce_threshold=-1e9, device="cpu")


def test_duplicate_prompts_are_dropped_with_a_warning(tmp_path, caplog):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"instruction": t}) + "\n" for t in "a b a c b a".split()))
    with caplog.at_level(logging.WARNING):
        prompts = load_prompts(tmp_path / "p.jsonl")
    assert [p.instruction for p in prompts] == ["a", "b", "c"]
    assert "3 duplicate prompt(s) dropped" in caplog.text and "3 unique prompts remain" in caplog.text


def test_csv_quotes_that_close_are_still_fine(tmp_path):
    (tmp_path / "p.csv").write_text('instruction,category\n"say ""hi"", then, bye",x\nplain,y\n')
    assert [p.instruction for p in load_prompts(tmp_path / "p.csv")] == ['say "hi", then, bye', "plain"]


def test_completions_of_prompt_files_stay_inside_the_run(tmp_path):
    run = RunDir(tmp_path / "run", create=True)
    a = run.completions_path(str(tmp_path / "a" / "f.json"), "none")
    b = run.completions_path(str(tmp_path / "b" / "f.json"), "none")
    assert a.parent == b.parent == run / "completions" and a != b
    assert a.name.startswith("f-") and a.name.endswith("__none.jsonl")
    assert run.completions_path("jailbreakbench", "ablate:dim").name == "jailbreakbench__ablate_dim.jsonl"


def test_records_of_another_n_or_length_do_not_replace_each_other(tmp_path):
    run = RunDir(tmp_path, create=True)
    base = {"intervention": "none", "dataset": "jailbreakbench", "judge": "substring", "metric": "refusal_rate"}
    run.add_metrics([{**base, "n": 8, "unclear": 0, "max_new_tokens": 32, "rate": 0.5}])
    run.add_metrics([{**base, "n": 2, "unclear": 0, "max_new_tokens": 32, "rate": 1.0}])
    run.add_metrics([{**base, "n": 8, "unclear": 0, "max_new_tokens": 64, "rate": 0.4}])
    assert sorted((r["n"], r["max_new_tokens"]) for r in run.metrics()) == [(2, 32), (8, 32), (8, 64)]
    run.add_metrics([{**base, "n": 7, "unclear": 1, "max_new_tokens": 32, "rate": 0.6}])  # same 8 prompts, re-judged
    assert sorted((r["n"], r["max_new_tokens"], r["rate"]) for r in run.metrics()) == [
        (2, 32, 1.0), (7, 32, 0.6), (8, 64, 0.4)]


def test_run_settings_check(tmp_path):
    run = tmp_path / "run"
    (run / "directions").mkdir(parents=True)
    settings = load_settings(None, {"model": "m"})
    old, manifest = settings.flat(), {"config": settings.run_config()}
    # nothing made yet: any setting may change
    assert "seed" in check_run_settings(run, manifest, {**old, "seed": 3})
    (run / "activations.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"seed: 0 \(run\) vs 3 \(now\)"):
        check_run_settings(run, manifest, {**old, "seed": 3})
    with pytest.raises(ConfigError, match="filter_train: True"):
        check_run_settings(run, manifest, {**old, "filter_train": False})
    # selection settings: free until a DIM direction exists, then only for a verb that re-selects
    assert check_run_settings(run, manifest, {**old, "kl_threshold": 0.5}) == {"kl_threshold": (0.1, 0.5)}
    (run / "directions" / "dim.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="kl_threshold"):
        check_run_settings(run, manifest, {**old, "kl_threshold": 0.5})
    assert check_run_settings(run, manifest, {**old, "kl_threshold": 0.5}, SELECTION_SETTINGS)
    # evaluation sizes never make artifacts stale
    assert check_run_settings(run, manifest, {**old, "n_eval": 5, "max_new_tokens": 64}) == {}


def _tiny_cfg(model_dir, **kw):
    return load_settings(None, {"model": str(model_dir), **TINY_RUN, **kw})


def test_resume_refuses_other_settings_and_records_allowed_ones(tmp_path, tiny_model_dir):
    from refusal_atlas.workflows.run import run

    r = tmp_path / "r"
    run(_tiny_cfg(tiny_model_dir), r)
    before = {p.name: p.read_bytes() for p in (r / "directions").iterdir()}
    for change in ({"seed": 1}, {"n_train": 8}, {"model": str(tmp_path)}):
        with pytest.raises(ConfigError, match="other settings"):
            run(_tiny_cfg(tiny_model_dir, **change), r, resume=True)
    assert {p.name: p.read_bytes() for p in (r / "directions").iterdir()} == before
    assert json.loads((r / "manifest.json").read_text())["config"]["data"]["seed"] == 0
    # an evaluation size may change: it reaches the manifest, and both measurements are kept
    run(_tiny_cfg(tiny_model_dir, n_eval=3), r, resume=True)
    manifest = json.loads((r / "manifest.json").read_text())
    assert manifest["config"]["evaluation"]["n_eval"] == 3
    rows = [m for m in json.loads((r / "metrics.json").read_text()) if m["intervention"] == "none"]
    assert sorted({m["n"] + m.get("unclear", 0) for m in rows}) == [3, 4]


def test_select_override_reaches_the_manifest(tmp_path, tiny_model_dir):
    from refusal_atlas.workflows.run import run
    from refusal_atlas.settings import run_settings
    from refusal_atlas.workflows.workspace import open_workspace

    r = tmp_path / "r"
    run(_tiny_cfg(tiny_model_dir), r)
    manifest = json.loads((r / "manifest.json").read_text())
    cfg = run_settings(manifest, {"kl_threshold": 0.25})
    with pytest.raises(ConfigError, match="kl_threshold"):
        open_workspace(cfg, r, must_exist=True)
    open_workspace(cfg, r, must_exist=True, allowed=SELECTION_SETTINGS)
    assert json.loads((r / "manifest.json").read_text())["config"]["selection"]["kl_threshold"] == 0.25


def test_a_run_with_an_old_flat_manifest_reopens_and_keeps_its_settings(tmp_path, tiny_model_dir):
    """A manifest written before the settings had sections (a flat ``config``) still guards its run: a stale
    change is refused, and reopening it rewrites the same values in sections."""
    from refusal_atlas.settings import run_settings
    from refusal_atlas.workflows.run import run
    from refusal_atlas.workflows.workspace import reopen_workspace

    r = tmp_path / "r"
    ws, _ = run(_tiny_cfg(tiny_model_dir), r)
    nested = ws.settings.run_config()
    manifest = json.loads((r / "manifest.json").read_text())
    (r / "manifest.json").write_text(json.dumps({**manifest, "config": ws.settings.flat()}))
    with pytest.raises(ConfigError, match=r"seed: 0 \(run\) vs 2 \(now\)"):
        reopen_workspace(r, {"seed": 2})
    assert run_settings(json.loads((r / "manifest.json").read_text())) == ws.settings
    reopen_workspace(r)
    assert json.loads((r / "manifest.json").read_text())["config"] == nested


@pytest.fixture(scope="module")
def never_refusing_model(tmp_path_factory):
    """The tiny model with the refusal-start tokens' unembedding rows pushed far down."""
    from refusal_atlas.evaluation.refusal import refusal_token_ids
    from refusal_atlas.model.saving import save_model_dir

    t = TinyLoaded("qwen2")
    ids = refusal_token_ids(t.tokenizer)
    t.model.lm_head.weight.data[ids] = -50 * t.model.lm_head.weight.data.abs().max()
    path = tmp_path_factory.mktemp("models") / "never_refuses"
    save_model_dir(t.model, t.tokenizer, path)
    return path


def test_a_model_that_never_refuses_stops_naming_the_rate(tmp_path, never_refusing_model):
    from refusal_atlas.workflows.run import run

    r = tmp_path / "r"
    with pytest.raises(ConfigError, match=r"refuses only 0\.0% \(0 of 6\) of the harmful train prompts") as exc:
        run(_tiny_cfg(never_refusing_model, filter_train=True), r)
    assert "--allow-low-refusal" in str(exc.value)
    manifest = json.loads((r / "manifest.json").read_text())
    assert manifest["baseline_refusal"]["rate"] == 0.0 and manifest["status"].startswith("stopped")
    assert not (r / "activations.safetensors").exists()


def test_low_refusal_allowed_continues_with_a_recorded_warning(tmp_path, tiny_model_dir, monkeypatch, caplog):
    import refusal_atlas.workflows.run as pipeline

    calls = []

    def scores(ws, prompts):  # harmful (first call): 2 of 25 refused (8%); harmless: none refused
        calls.append(len(prompts))
        return [1.0, 1.0] + [-1.0] * 23 if len(calls) == 1 else [-1.0] * len(prompts)

    monkeypatch.setattr(pipeline, "train_refusal_scores", scores)
    r = tmp_path / "r"
    with pytest.raises(ConfigError, match=r"8\.0% \(2 of 25\)"):
        pipeline.run(_tiny_cfg(tiny_model_dir, filter_train=True, n_train=25), r)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        pipeline.run(_tiny_cfg(tiny_model_dir, filter_train=True, n_train=25), r, resume=True, allow_low_refusal=True)
    manifest = json.loads((r / "manifest.json").read_text())
    assert manifest["baseline_refusal"]["allowed_low"] is True and "8.0%" in manifest["baseline_refusal"]["warning"]
    assert manifest["status"] == "complete" and "continuing (--allow-low-refusal)" in caplog.text


def test_ctrl_c_exits_130_with_a_message(monkeypatch, capsys):
    import refusal_atlas.workflows.verbs as verbs
    from refusal_atlas.cli import main

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(verbs, "check_new_run_dir", interrupt)  # the first step of `run`
    monkeypatch.setattr(sys, "argv", ["refusal-atlas", "run", "-r", "x"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130 and "interrupted: finished steps are kept" in capsys.readouterr().err


_PROBE = """
import sys
from refusal_atlas.cli import main
sys.argv = ["refusal-atlas", *sys.argv[1:]]
try:
    main()
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported")
"""


def _timed(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - start


def test_evaluate_on_a_missing_run_dir_is_fast_in_a_fresh_process(tmp_path):
    """The issue's check: `evaluate -r /no/such/dir` exits non-zero in under 2 s and creates nothing.

    Never importing torch is what makes it fast (no model can load without it). On a machine so
    loaded that starting Python with the CLI's imports alone takes over 2 s, the bound is 1.5x that.
    """
    target = Path("/no/such/dir") if not Path("/no").exists() else tmp_path / "no" / "such" / "dir"
    proc, elapsed = _timed(["evaluate", "-r", str(target)], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: run directory not found: {target}"
    assert proc.stdout.strip() == "torch not imported"
    assert not target.exists() and not target.parent.exists() and list(tmp_path.iterdir()) == []
    _, startup = _timed(["--help"], tmp_path)  # the same imports, no verb
    assert elapsed < max(2.0, 1.5 * startup), f"{elapsed:.2f} s (Python + CLI imports: {startup:.2f} s)"


def test_run_help_offers_the_flags_the_errors_name():
    from typer.testing import CliRunner

    from refusal_atlas.cli import app

    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "--chat-template" in out and "--allow-low-refusal" in out
