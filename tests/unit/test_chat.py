"""`refusal-atlas chat`: streamed answers of the original and the edited model, driven through stdin."""

import os
import subprocess
import sys

import pytest

from refusal_atlas.model.activations import extract
from refusal_atlas.settings import load_settings
from refusal_atlas.model.conversation import Conversation
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.model.generation import generate
from refusal_atlas.edits import DirectionalAblation
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model
from refusal_atlas.core.rundir import RunDir

TURNS = ["tell joke", "write poem about cats please"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir):
    """A run directory whose direction is the mean residual at layer 2: ablating it changes greedy output."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    adapter, chat = ModelAdapter(loaded.model), ChatFormatter(loaded.tokenizer)
    acts = extract(adapter, chat, TURNS + ["explain the weather", "give me recipe for cake"], positions=[-1])
    direction = DirectionSet(acts.mean_at(2, -1).float(), 2, "dim", -1)
    root = tmp_path_factory.mktemp("chat") / "run"
    run = RunDir(root, create=True)
    run.init_manifest(load_settings(None, {"model": str(tiny_model_dir), "device": "cpu"}).run_config(), {"name": "tiny"})
    direction.save(run.direction_path("dim"))
    return root, loaded, direction


def _fresh(loaded, intervention, user, max_new_tokens=8):
    conv = Conversation(ModelAdapter(loaded.model), loaded.tokenizer, intervention, None, max_new_tokens)
    return "".join(conv.reply(user)).strip()


def test_streamed_reply_equals_batched_generation(chat_run):
    _, loaded, direction = chat_run
    adapter, chat = ModelAdapter(loaded.model), ChatFormatter(loaded.tokenizer)
    for spec in (None, DirectionalAblation.from_directions(direction)):
        conv = Conversation(adapter, loaded.tokenizer, spec, None, 8)
        pieces = list(conv.reply(TURNS[0]))
        assert len(pieces) > 1  # streamed, not one block
        assert "".join(pieces).strip() == generate(adapter, chat, [TURNS[0]], max_new_tokens=8, intervention=spec)[0]
        assert [m["role"] for m in conv.history] == ["user", "assistant"]


def _chat(run_dir, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "chat", "-r", str(run_dir),
                           "--max-new-tokens", "8", *extra], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "REFUSAL_ATLAS_QUIET": "1"})


def _answers(stdout: str, label: str) -> list[str]:
    return [line[len(label) + 3:].strip() for line in stdout.splitlines() if line.startswith(f"[{label}] ")]


def test_two_turns_through_stdin_then_reset(chat_run):
    run_dir, loaded, direction = chat_run
    script = "\n".join([TURNS[0], TURNS[1], "/reset", TURNS[1], "/system you are helpful", TURNS[0], "/quit",
                        "never read"]) + "\n"
    proc = _chat(run_dir, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, edited = _answers(proc.stdout, "original"), _answers(proc.stdout, "edited ablate:dim")
    assert len(original) == len(edited) == 4, proc.stdout
    assert "(history cleared)" in proc.stdout and "(system prompt: 'you are helpful')" in proc.stdout
    assert original != edited  # the edit changes the model's answers
    ablate = DirectionalAblation.from_directions(direction)
    # turn 1 and the first turn after /reset are what a fresh conversation answers
    assert original[0] == _fresh(loaded, None, TURNS[0]) and edited[0] == _fresh(loaded, ablate, TURNS[0])
    assert original[2] == _fresh(loaded, None, TURNS[1]) and edited[2] == _fresh(loaded, ablate, TURNS[1])
    # turn 2 saw turn 1's history: a history-aware conversation reproduces it
    conv = Conversation(ModelAdapter(loaded.model), loaded.tokenizer, None, None, 8)
    "".join(conv.reply(TURNS[0]))
    assert original[1] == "".join(conv.reply(TURNS[1])).strip()


def test_chat_fails_fast_on_bad_input(chat_run, tmp_path):
    """Each check runs before the model loads: the run's manifest names a model that does not exist, so
    loading first would report that instead."""
    run_dir, _, direction = chat_run
    ghost = RunDir(tmp_path / "ghost", create=True)
    ghost.init_manifest(load_settings(None, {"model": str(tmp_path / "no-such-model"), "device": "cpu"}).run_config(),
                        {"name": "x"})
    direction.save(ghost.direction_path("dim"))
    for args, message in ((["-r", str(tmp_path / "nope")], "is not a run directory"),
                          (["-r", str(ghost.path), "--directions", "som"], "no direction file 'som'"),
                          (["-r", str(ghost.path), "--edit", "shout"], "unknown intervention"),
                          (["-r", str(ghost.path), "--edit", "none"], "original model twice")):
        proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "chat", *args], input="hi\n",
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()
