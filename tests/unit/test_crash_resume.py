"""Kill -9 during extraction, generation, search and gradient training, rerun the same command.

Each test runs the CLI in a subprocess that SIGKILLs itself at a chosen point
(REFUSAL_ATLAS_TEST_KILL_AFTER=<stage>:<n>, no timing involved), reruns the same command, and checks
that (a) the final artifacts equal an uninterrupted run's bit for bit, and (b) the rerun did only
the work the killed run had not finished (REFUSAL_ATLAS_TEST_WORK_LOG counts the units of work each
process did).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from refusal_atlas.settings import load_settings
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.io import load_tensors


def killed_cli(*args: str, kill: str, log: Path) -> None:
    """Run the CLI in a subprocess that SIGKILLs itself after the ``kill`` point (``stage:n``)."""
    env = {**os.environ, "REFUSAL_ATLAS_QUIET": "1", "REFUSAL_ATLAS_TEST_KILL_AFTER": kill,
           "REFUSAL_ATLAS_TEST_WORK_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def cli(*args: str, log: Path | None = None) -> None:
    """Run the CLI in this process (the uninterrupted runs and the reruns), logging its work to ``log``."""
    from typer.testing import CliRunner

    from refusal_atlas.cli import app

    old = os.environ.pop("REFUSAL_ATLAS_TEST_WORK_LOG", None)
    if log is not None:
        os.environ["REFUSAL_ATLAS_TEST_WORK_LOG"] = str(log)
    try:
        res = CliRunner().invoke(app, list(args))
    finally:
        os.environ.pop("REFUSAL_ATLAS_TEST_WORK_LOG", None)
        if old is not None:
            os.environ["REFUSAL_ATLAS_TEST_WORK_LOG"] = old
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"


def work(log: Path, stage: str) -> int:
    return log.read_text().split().count(stage) if log.exists() else 0


def same_tensors(a: Path, b: Path) -> None:
    (ta, ma), (tb, mb) = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{a.name}: tensors differ"
    assert ma == mb


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model_dir):
    """A finished tiny run (DIM fixed at layer 2, batch sizes 2 so every step has several batches)."""
    from refusal_atlas.workflows.run import run
    from refusal_atlas.core.rundir import RunDir
    from refusal_atlas.directions.som import SomDirections
    from refusal_atlas.workflows.som import som_step

    cfg = load_settings(None, dict(model=str(tiny_model_dir), n_train=8, n_val=4, n_eval=4, filter_train=False,
                                 layer=2, max_new_tokens=2, batch_size=2, generation_batch_size=2, device="cpu"))
    path = tmp_path_factory.mktemp("crash") / "base"
    run(cfg, path)
    som_step(RunDir(path), SomDirections(grid=(2, 3), iterations=300))
    return path


def copies(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two identical run directories: one runs uninterrupted, the other is killed and resumed."""
    out = []
    for name in ("straight", "killed"):
        shutil.copytree(base, tmp_path / name)
        out.append(tmp_path / name)
    return out[0], out[1]


def test_extraction_killed_after_one_prompt_set_resumes_bit_identically(tmp_path, tiny_model_dir):
    args = ("--model", str(tiny_model_dir), "--n-train", "6", "--no-filter-train")
    straight, crashed, log = tmp_path / "straight", tmp_path / "killed", tmp_path / "work.log"
    cli("extract", "-r", str(straight), *args)
    killed_cli("extract", "-r", str(crashed), *args, kill="extract:1", log=log)
    assert work(log, "extract") == 1 and not (crashed / "activations.safetensors").exists()
    assert (crashed / "partial" / "activations.harmful.safetensors").is_file()
    log.unlink()
    cli("extract", "-r", str(crashed), *args, log=log)
    assert work(log, "extract") == 1  # only the harmless set: the harmful one was not recomputed
    same_tensors(straight / "activations.safetensors", crashed / "activations.safetensors")
    assert not (crashed / "partial").exists()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluation_killed_mid_generation_keeps_written_rows_and_ends_identical(base_run, tmp_path):
    straight, crashed = copies(base_run, tmp_path)
    log = tmp_path / "work.log"
    args = ("--datasets", "harmless_test", "--interventions", "none,ablate", "--n", "8", "--max-new-tokens", "5",
            "--kl-tokens", "5", "--judge", "substring")
    cli("evaluate", "-r", str(straight), *args, log=log)
    total = work(log, "generate")
    assert total == 8  # 2 interventions × 4 batches of 2 prompts
    log.unlink()
    killed_cli("evaluate", "-r", str(crashed), *args, kill="generate:5", log=log)
    none_file = crashed / "completions" / "harmless_test__none.jsonl"
    saved = [r for r in _rows(none_file) if r["max_new_tokens"] == 5]
    assert work(log, "generate") == 5 and len(saved) == 8  # the first intervention was complete
    ablate_file = crashed / "completions" / "harmless_test__ablate_dim.jsonl"
    assert len([r for r in _rows(ablate_file) if r["max_new_tokens"] == 5]) == 2  # one batch of the second
    log.unlink()
    cli("evaluate", "-r", str(crashed), *args, log=log)
    assert work(log, "generate") == total - 5  # written rows were not generated again
    for name in ("harmless_test__none.jsonl", "harmless_test__ablate_dim.jsonl"):
        assert (straight / "completions" / name).read_text() == (crashed / "completions" / name).read_text()

    def metrics(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "reused_completions"}
                for r in json.loads((run / "metrics.json").read_text())]

    assert metrics(straight) == metrics(crashed)


def _trials(run: Path) -> dict[int, tuple]:
    study = optuna.load_study(study_name="search-som", storage=f"sqlite:///{run / 'study.db'}")
    return {t.number: (t.user_attrs["ids"], t.values, t.state.name) for t in study.trials}


def test_search_killed_after_two_trials_resumes_to_the_same_study(base_run, tmp_path):
    straight, crashed = copies(base_run, tmp_path)
    log = tmp_path / "work.log"
    args = ("--k", "2", "--trials", "4", "--seed", "3", "--n-startup-trials", "2", "--no-evaluate")
    cli("search", "subsets", "-r", str(straight), *args)
    killed_cli("search", "subsets", "-r", str(crashed), *args, kill="trial:2", log=log)
    before = _trials(crashed)
    assert len(before) == 2
    log.unlink()
    cli("search", "subsets", "-r", str(crashed), *args, log=log)
    assert work(log, "trial") == 2  # finished trials were kept, not rerun
    after = _trials(crashed)
    assert all(after[n] == v for n, v in before.items())
    assert after == _trials(straight)
    same_tensors(straight / "directions" / "search_best.safetensors", crashed / "directions" / "search_best.safetensors")
    s1, s2 = (json.loads((r / "search.json").read_text()) for r in (straight, crashed))

    def timeless(rec):  # trial records carry wall-clock start/end times, which differ between the two runs
        return {k: v for k, v in rec.items() if k not in ("start", "end")}

    assert timeless(s1["chosen"]) == timeless(s2["chosen"])
    assert [timeless(r) for r in s1["pareto"]] == [timeless(r) for r in s2["pareto"]]


TRAIN = ("--n-train", "4", "--n-val", "2", "--target-tokens", "3", "--steps", "4", "--batch-size", "2",
         "--micro-batch", "1", "--eval-every", "1")


def test_rdo_training_killed_resumes_from_its_checkpoint_bit_identically(base_run, tmp_path):
    straight, crashed = copies(base_run, tmp_path)
    kill_after = 2  # mid-run: AdamW moments, sampler RNG, best iterate and histories all restored
    log = tmp_path / "work.log"
    cli("directions", "rdo", "-r", str(straight), *TRAIN, log=log)
    assert work(log, "train") == 4
    log.unlink()
    killed_cli("directions", "rdo", "-r", str(crashed), *TRAIN, kill=f"train:{kill_after}", log=log)
    assert not (crashed / "directions" / "rdo.safetensors").exists()
    _, meta = load_tensors(crashed / "checkpoints" / "rdo" / "run1.safetensors")
    assert meta["state"]["step"] == kill_after and meta["state"]["stopped"] is None
    log.unlink()
    cli("directions", "rdo", "-r", str(crashed), *TRAIN, log=log)
    assert work(log, "train") == 4 - kill_after  # the checkpointed steps were not trained again
    a = DirectionSet.load(straight / "directions" / "rdo.safetensors")
    b = DirectionSet.load(crashed / "directions" / "rdo.safetensors")
    assert torch.equal(a.vectors, b.vectors)
    for key in ("history", "val_history", "best_step", "stopped"):
        assert a.meta[key] == b.meta[key], key
    assert len(b.meta["history"]["loss"]) == 4
    log.unlink()
    cli("directions", "rdo", "-r", str(crashed), *TRAIN, log=log)  # a finished run is not trained again
    assert work(log, "train") == 0
    assert torch.equal(DirectionSet.load(crashed / "directions" / "rdo.safetensors").vectors, a.vectors)


def test_changed_training_flags_do_not_resume_a_foreign_checkpoint(base_run, tmp_path):
    _, run = copies(base_run, tmp_path)
    log = tmp_path / "work.log"
    cli("directions", "rdo", "-r", str(run), *TRAIN)  # a finished checkpoint with the default loss weights
    cli("directions", "rdo", "-r", str(run), *TRAIN, "--ablation-weight", "2.0", log=log)
    assert work(log, "train") == 4  # other loss weights: trained from the start, not restored
    log.unlink()
    cli("directions", "rdo", "-r", str(run), *TRAIN, "--steps", "3", log=log)
    assert work(log, "train") == 3  # another step budget: likewise


class _Crash(Exception):
    pass


def _two_loops(directory: Path, crash_at_call: int | None = None) -> tuple[list, int]:
    """Two training loops in one checkpointing session (like a cone sweep or RepInd restarts) on a
    model-free loss; ``crash_at_call`` raises inside the loss, as a kill mid-step would stop it."""
    from refusal_atlas.directions.checkpoint import checkpointing
    from refusal_atlas.directions.optim import TrainConfig, train_directions

    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    count = {"calls": 0, "crash": crash_at_call}  # a dict: the checkpoint key digests settings, not state

    def loss_fn(param, idx, slot, step):
        count["calls"] += 1
        if count["calls"] == count["crash"]:
            raise _Crash
        return ((param[0] @ x[idx].T) ** 2).mean() - param[0, 0], {}

    def validate(param):
        return {"objective": float(((param[0] @ x.T) ** 2).mean() - param[0, 0])}

    out = []
    with checkpointing(directory, identity={"test": 1}):
        for seed in (1, 2):
            cfg = TrainConfig(steps=5, batch_size=2, micro_batch=1, eval_every=2, patience=1, seed=seed)
            start = torch.randn(1, 8, generator=torch.Generator().manual_seed(seed))
            out.append(train_directions(start, loss_fn, 6, validate, cfg))
    return out, count["calls"]


def test_training_checkpoints_resume_each_loop_of_a_session(tmp_path):
    straight, calls = _two_loops(tmp_path / "straight")
    assert calls == 2 * 5 * 2  # 2 loops × 5 steps × 2 micro-batches
    with pytest.raises(_Crash):
        _two_loops(tmp_path / "crashed", crash_at_call=10 + 7)  # loop 2, in step 4
    resumed, calls = _two_loops(tmp_path / "crashed")
    assert calls == 2 * 2  # loop 1 was finished; loop 2 redoes only steps 4 and 5
    for a, b in zip(straight, resumed):
        assert torch.equal(a.params, b.params) and torch.equal(a.last, b.last)
        assert (a.best_step, a.stopped, a.history, a.val_history) == (b.best_step, b.stopped, b.history, b.val_history)
    assert not torch.equal(straight[0].params, straight[1].params)
