"""Memory and disk through the real CLI: a job that cannot fit, a disk too small or full, SIGTERM mid-write.

Each must end with one ``error:`` line and leave nothing behind: no run directory, no output directory, no
hidden temporary directory next to ``--out``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.model.saving import save_model_dir
from tiny import tiny_bpe_tokenizer, tiny_model

MEMORY_WORDS = ["needs about", "1.0 MiB is available (the memory_limit setting)", "weights", "runtime"]


def test_a_job_that_cannot_fit_stops_before_loading(cli, run_dir, tiny_model_dir, monkeypatch):
    """Forced with the memory_limit setting: the estimate (weights, runtime, ...) is named, nothing loads or is
    made (the ``cli`` fixture checks both)."""
    monkeypatch.setenv("REFUSAL_ATLAS_MEMORY_LIMIT", "1MiB")
    cli(["run", "--model", tiny_model_dir, "-r", "new_run"], MEMORY_WORDS)
    cli(["export", "-r", run_dir, "--out", "exported"], MEMORY_WORDS)
    cli(["evaluate", "-r", run_dir, "--n", "2"], MEMORY_WORDS)


def test_an_export_larger_than_the_free_disk_stops_before_loading(cli, run_dir, monkeypatch):
    import refusal_atlas.core.resources as resources

    monkeypatch.setattr(resources, "free_disk", lambda path: 1000)
    cli(["export", "-r", run_dir, "--out", "exported"], ["exporting safetensors writes about", "only 1000 B is free"])
    cli(["export", "-r", run_dir, "--out", "exported", "--format", "gguf"], "exporting gguf writes about")


# --- the export really running out of disk, or stopped -----------------------------------------------------
@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, make_run) -> Path:
    """A run on a model of about 36 MB (float32), so its export does not fit a 20 MB file system."""
    root = tmp_path_factory.mktemp("wide")
    tok = tiny_bpe_tokenizer()
    save_model_dir(tiny_model("qwen2", n_layers=4, d_model=256, vocab_size=12000), tok, root / "model")
    run = make_run(root / "run", root / "model", device="cpu")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"].update(d_model=256)
    (run / "manifest.json").write_text(json.dumps(manifest))
    DirectionSet(torch.randn(1, 256), layer=2, method="dim").save(run / "directions" / "dim.safetensors")
    return run


def _main(args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    from refusal_atlas.cli import main

    monkeypatch.setattr(sys, "argv", ["refusal-atlas", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, [line for line in err.strip().splitlines() if line.strip()]


def _left_behind(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def test_a_full_disk_mid_write_is_one_error_and_leaves_nothing(wide_run, tmp_path, monkeypatch, capsys):
    """Simulated (runs everywhere): the safetensors writer fails with ENOSPC after writing part of the file."""
    import refusal_atlas.model.saving as saving

    def full(path, entries, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(saving, "stream_safetensors", full)
    out = tmp_path / "exported"
    code, lines = _main(["export", "-r", wide_run, "--out", out], monkeypatch, capsys)
    assert code == 2 and lines[-1].startswith("error: no space left on the device while writing")
    assert sum(line.startswith("error:") for line in lines) == 1
    assert _left_behind(tmp_path, out) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 20 MB tmpfs (needs root and mount; CI runs as root), unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_an_export_onto_a_small_tmpfs(wide_run, small_tmpfs, monkeypatch, capsys):
    """A real full disk: first the check before loading refuses; with that check out of the way (another
    process filling the disk while we write), the write itself fails. One error line each, nothing left."""
    out = small_tmpfs / "exported"
    code, lines = _main(["export", "-r", wide_run, "--out", out], monkeypatch, capsys)
    assert code == 2 and "exporting safetensors writes about" in lines[-1] and "free there" in lines[-1]
    assert list(small_tmpfs.iterdir()) == []

    import refusal_atlas.workflows.validate as validate

    monkeypatch.setattr(validate, "check_disk", lambda *a, **k: None)
    for fmt in (["safetensors"], ["gguf", "--quant", "f32"]):
        code, lines = _main(["export", "-r", wide_run, "--out", out, "--format", *fmt], monkeypatch, capsys)
        assert code == 2 and lines[-1].startswith("error: no space left on the device while writing"), lines
        assert sum(line.startswith("error:") for line in lines) == 1
        assert list(small_tmpfs.iterdir()) == [], "a temporary file or directory was left on the full disk"


_SLOW_EXPORT = """
import signal, sys, time
import refusal_atlas.model.saving as saving
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
real = saving.stream_safetensors

def slow(path, entries, metadata=None):  # 0.3 s per tensor: a long write to stop in the middle of
    def late(get):
        return lambda: (time.sleep(0.3), get())[1]
    return real(path, [type(e)(e.name, e.shape, e.dtype, late(e.get)) for e in entries], metadata)

saving.stream_safetensors = slow
from refusal_atlas.cli import main
sys.argv = ["refusal-atlas", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("sig,code,words", [(signal.SIGTERM, 143, "error: terminated (SIGTERM)"),
                                            (signal.SIGINT, 130, "error: interrupted")])
def test_an_export_stopped_mid_write_leaves_nothing(wide_run, tmp_path, sig, code, words):
    out = tmp_path / "exported"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, "export", "-r", str(wide_run), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"})
    deadline = time.monotonic() + 600  # loading takes minutes on a busy machine
    while time.monotonic() < deadline:  # wait until the weights file is being written in the temporary directory
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".exported.")]
        if temps and (temps[0] / "model.safetensors").exists():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"the export never started writing: {proc.communicate()[1][-3000:]}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == code, err
    assert lines[-1].startswith(words) and "nothing half-written was kept" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err
    assert _left_behind(tmp_path, out) == []
