"""`export` in three formats from a tiny run, `verify` (hashes, one flipped byte, --rerun), `evaluate --model`."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.core.io import write_json
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.core.rundir import RunDir
from test_evaluate import cli
from tiny import tiny_bpe_tokenizer, tiny_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tok = tiny_bpe_tokenizer()
    save_model_dir(tiny_model("qwen2", vocab_size=len(tok) + 5), tok, root / "model")
    config = dict(model=str(root / "model"), device="cpu", batch_size=4, n_eval=3, max_new_tokens=6)
    run = RunDir(root / "run", create=True)
    write_json(run.manifest_path, {"config": config, "status": "complete"})
    torch.manual_seed(0)
    DirectionSet(torch.randn(2, 32) * 4, layer=2, method="dim").save(run.direction_path("dim"))
    return run.path


@pytest.mark.parametrize("fmt,extra,model_file", [("safetensors", [], "model.safetensors"),
                                                  ("lora", [], "adapter_model.safetensors"),
                                                  ("gguf", ["--quant", "q8_0"], "model.gguf")])
def test_export_verify_rerun_and_evaluate(run_dir, tmp_path, capsys, fmt, extra, model_file):
    out = tmp_path / fmt
    code, stdout, err = cli(["export", "-r", str(run_dir), "--out", str(out), "--format", fmt, *extra], capsys)
    assert code == 0, err
    bundle = out / "reproduce"
    for name in ("run_config.json", "edit.json", "export.json", "versions.json", "source.json", "files.json",
                 "edit_spec.json", "edit_spec.safetensors"):
        assert (bundle / name).is_file(), name
    files = json.loads((bundle / "files.json").read_text())["sha256"]
    assert model_file in files and "reproduce/edit.json" in files
    assert json.loads((bundle / "source.json").read_text())["files"]["model.safetensors"]
    assert json.loads((bundle / "versions.json").read_text())["torch"] == torch.__version__
    assert (out / model_file).stat().st_mode & 0o044  # readable by others, like any ordinary file

    code, stdout, _ = cli(["verify", str(out), "--rerun"], capsys)
    assert code == 0 and f"{len(files)}/{len(files)} files match" in stdout
    assert "model files identical byte for byte" in stdout and "differs" not in stdout

    code, stdout, _ = cli(["evaluate", "-r", str(run_dir), "--model", str(out), "--datasets",
                           "jailbreakbench,harmless_test", "--n", "3", "--interventions", "none,ablate",
                           "--kl-tokens", "4"], capsys)
    assert code == 0
    recs = json.loads((run_dir / "metrics.json").read_text())
    mine = [r for r in recs if r.get("kind") == "exported" and r.get("model") == str(out)]
    assert {r["dataset"] for r in mine} == {"jailbreakbench", "harmless_test"}
    kl = [r for r in mine if r["metric"] == "kl_first_token"]
    assert kl and kl[0]["n"] == 3
    # the export is the hook ablation baked in: next to it, the original's KL to itself would be 0
    ablate_kl = next(r for r in recs if r.get("kind") == "ablate" and r["metric"] == "kl_first_token")
    assert kl[0]["kl"] == pytest.approx(ablate_kl["kl"], rel=0.05 if fmt == "gguf" else 1e-3)

    # one changed byte in the model file is detected
    data = bytearray((out / model_file).read_bytes())
    data[len(data) // 2] ^= 1
    (out / model_file).write_bytes(bytes(data))
    code, stdout, _ = cli(["verify", str(out)], capsys)
    assert code == 1 and f"changed: {model_file}" in stdout


def test_export_refuses_bad_requests_before_loading(run_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [(["--out", str(taken)], "not empty"),
             (["--out", str(tmp_path / "a"), "--format", "onnx"], "unknown export format 'onnx'"),
             (["--out", str(tmp_path / "a"), "--format", "gguf", "--quant", "q3_k"], "unknown GGUF quantization"),
             (["--out", str(tmp_path / "a"), "--quant", "q8_0"], "--quant applies to --format gguf only"),
             (["--out", str(tmp_path / "a"), "--directions", "nope"], "needs a direction file"),
             (["--out", str(run_dir / "inside")], "inside the run directory")]
    for args, message in cases:
        code, _, err = cli(["export", "-r", str(run_dir), *args], capsys)
        assert code == 2 and message in err, (args, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and not (tmp_path / "a").exists()
    code, _, err = cli(["verify", str(tmp_path / "taken")], capsys)
    assert code == 2 and "reproduce/files.json" in err
    code, _, err = cli(["evaluate", "-r", str(run_dir), "--model", str(tmp_path / "missing")], capsys)
    assert code == 2 and "exported model not found" in err
