"""Running heretic-llm 1.4.0 headless: its venv, prompt folders, config.toml, output parsing and menus.

heretic has no non-interactive mode. With ``COLAB_GPU=1`` its menus fall back to ``input()``: each menu
prints numbered lines ("[2] [Trial  14] Refusals: 14/39, KL divergence: 0.0602", ..., "[k] Exit program")
and reads a number from stdin. :class:`MenuDriver` reads those lines and answers so that, after its
search, heretic saves the merged model of every trial on its Pareto front into a folder of ours, then
exits. heretic's own menu lists the front (its rule: by refusals then KL), so the saved models are
exactly its front, built by its own code (no rebuild in our edit space).

The pure parts (config, parsing, the menu state machine) are unit-tested in tests/unit/test_vs_heretic.py.
"""

from __future__ import annotations

import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from fronts import pareto

HERETIC = "heretic-llm==1.4.0"
TORCH = "torch==2.13.0"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean(line: str) -> str:
    return ANSI.sub("", line).rstrip("\r\n")


# --- prompt folders and config.toml -----------------------------------------------------------------------
DATASET_SCRIPT = """
import json, sys
from datasets import Dataset
spec = json.load(open(sys.argv[1]))
for role, (path, prompts) in spec.items():
    Dataset.from_dict({"text": prompts}).save_to_disk(path)
"""


def write_datasets(prompts: dict[str, list[str]], root: Path, python: str = sys.executable) -> dict[str, Path]:
    """One ``datasets`` save_to_disk folder per heretic role (column ``text``), written by ``python``
    (heretic's venv, so its own ``datasets`` version writes them). Text files would split prompts on newlines."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {role: (str(root / role), list(texts)) for role, texts in prompts.items()}
    for role, (_, texts) in spec.items():
        if not texts:
            raise ValueError(f"no prompts for heretic's {role}")
    (root / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    subprocess.run([python, "-c", DATASET_SCRIPT, str(root / "spec.json")], check=True)
    return {role: Path(path) for role, (path, _) in spec.items()}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def heretic_config(datasets: dict[str, Path], counts: dict[str, int], *, n_trials: int, n_startup_trials: int,
                   seed: int, max_response_length: int, batch_size: int, dtype: str = "float32",
                   system_prompt: str = "You are a helpful assistant.") -> str:
    """heretic's config.toml: one ``[role]`` table per prompt role (a save_to_disk folder, ``train[:N]``,
    column ``text``) and the settings heretic_baseline.md measured with; every other key at its default."""
    if set(datasets) != set(counts):
        raise ValueError(f"roles differ: datasets {sorted(datasets)}, counts {sorted(counts)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    top = {"dtypes": [dtype], "batch_size": batch_size, "max_response_length": max_response_length,
           "n_trials": n_trials, "n_startup_trials": n_startup_trials, "seed": seed, "export_strategy": "merge",
           "response_prefix": "", "system_prompt": system_prompt}
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for role in datasets:
        lines += ["", f"[{role}]", f"dataset = {_toml(str(datasets[role]))}",
                  f"split = {_toml(f'train[:{counts[role]}]')}", 'column = "text"']
    return "\n".join(lines) + "\n"


# --- parsing its output -----------------------------------------------------------------------------------
def parse_search_log(lines: list[tuple[float, str]]) -> dict:
    """heretic's search output, each line with the time it was read (the first pair: the process start) →
    trials (seconds, KL, refusals, parameters), the baseline refusals, set-up seconds, wall seconds to
    "Optimization finished!" and its Pareto front (its own rule: by refusals then KL, KL falling)."""
    trials: list[dict] = []
    base = n_bad = None
    t0 = lines[0][0] if lines else 0.0
    end = lines[-1][0] if lines else 0.0
    finished = False
    for t, raw in lines:
        line = clean(raw)
        if m := re.search(r"Running trial (\d+) of (\d+)", line):
            if trials and trials[-1].get("end") is None:
                trials[-1]["end"] = t
            trials.append({"index": int(m.group(1)), "start": t, "end": None})
        elif m := re.search(r"Initial refusals: (\d+)/(\d+)", line):
            base, n_bad = int(m.group(1)), int(m.group(2))
        elif trials and (m := re.search(r"KL divergence: ([0-9.eE+-]+)", line)) and "[Trial" not in line:
            trials[-1]["kl"] = float(m.group(1))
        elif trials and trials[-1].get("kl") is None and (m := re.search(r"^\s*\* ([\w.]+) = (.+?)\s*$", line)):
            trials[-1].setdefault("params", {})[m.group(1)] = m.group(2)  # "* attn.o_proj.max_weight = 1.09"
        elif trials and (m := re.search(r"^\s*\* Refusals: (\d+)/(\d+)", line)):
            trials[-1]["refusals"] = int(m.group(1))
            n_bad = int(m.group(2))
        elif "Optimization finished!" in line and not finished:
            end, finished = t, True
            if trials and trials[-1].get("end") is None:
                trials[-1]["end"] = t
    if trials and trials[-1].get("end") is None:
        trials[-1]["end"] = end
    done = [tr for tr in trials if "kl" in tr and "refusals" in tr]
    for tr in done:
        tr["seconds"] = tr["end"] - tr["start"]
    front = pareto([(tr["refusals"], tr["kl"]) for tr in done])
    return {"trials": done, "base_refusals": base, "n_bad": n_bad, "finished": finished,
            "setup_s": (trials[0]["start"] - t0) if trials else None, "search_s": end - t0,
            "median_trial_s": statistics.median(tr["seconds"] for tr in done) if done else None,
            "front": [list(p) for p in front]}


def parse_evaluation(lines: list[str]) -> dict:
    """``heretic --model A --evaluate-model B`` output → refusals, prompts, KL and A's baseline refusals."""
    out: dict = {}
    for raw in lines:
        line = clean(raw)
        if m := re.search(r"Initial refusals: (\d+)/(\d+)", line):
            out["base_refusals"] = int(m.group(1))
        elif m := re.search(r"^\s*\* KL divergence: ([0-9.eE+-]+)", line):
            out["kl"] = float(m.group(1))
        elif m := re.search(r"^\s*\* Refusals: (\d+)/(\d+)", line):
            out["refusals"], out["n"] = int(m.group(1)), int(m.group(2))
    if "kl" not in out or "refusals" not in out:
        raise ValueError("heretic's evaluation printed no 'KL divergence' / 'Refusals' line")
    return out


HERETIC_COMPONENTS = {"attn": "attn.o_proj", "mlp": "mlp.down_proj"}


def heretic_choice(params: dict[str, str]) -> dict:
    """heretic's trial parameters (as its log prints them) → the same edit as a choice of our search space
    (bench/heretic_trial.py; the held-out comparison scores heretic's own saved models, not these).

    Layer numbers are taken as they are: scored by heretic's evaluator, heretic's trial 14 rebuilt this way
    gave KL 0.0583 where heretic's own edit gave 0.0602 (2026-12-02), one layer later 0.0508.
    """
    index = params["direction_index"]
    choice: dict = {"projected": False, "norm_preserving": False, "embed": False}
    if index == "per layer":  # each block its own direction
        choice["source"] = "dim:per_layer"
    else:
        choice.update(source="dim:index", direction_index=float(index))
    for ours, theirs in HERETIC_COMPONENTS.items():
        choice[ours] = {"peak": float(params[f"{theirs}.max_weight"]),
                        "position": float(params[f"{theirs}.max_weight_position"]),
                        "floor": float(params[f"{theirs}.min_weight"]),
                        "distance": float(params[f"{theirs}.min_weight_distance"])}
    return choice


# --- its menus ------------------------------------------------------------------------------------------
class MenuDriver:
    """Answers heretic's numbered menus (one output line at a time) so that every Pareto trial is saved.

    Trial menu ("[i] [Trial  N] Refusals: r/n, KL divergence: d" ... "[k] Exit program"): the first listed
    trial not yet saved (or tried), else Exit. Action menu (its last line "[j] Return to the trial selection
    menu"): "Save the model to a local folder" ([1]) and the folder, once per trial, then Return. A finished
    study found on start ("[1] Show the results from the previous run"): show it. An interrupted one: stop
    (its wall time could not be measured). ``feed`` returns the text to write to heretic's stdin, or None.
    """

    def __init__(self, save_dir: Path):
        self.save_dir = Path(save_dir)
        self.menu: dict[int, int] = {}  # menu number → heretic trial index, of the trial menu being printed
        self.front: dict[int, dict] = {}  # trial index → {"refusals", "n", "kl"} as the menu lists it
        self.saved: dict[int, str] = {}
        self.failed: dict[int, str] = {}
        self.current: int | None = None
        self.pending: int | None = None
        self.done = False

    def path(self, index: int) -> Path:
        return self.save_dir / f"trial_{index}"

    def feed(self, raw: str) -> str | None:
        line = clean(raw)
        if m := re.search(r"\[(\d+)\] Show the results from the previous run", line):
            return f"{m.group(1)}\n"
        if re.search(r"\[\d+\] Continue the previous run", line):
            raise RuntimeError("heretic found an interrupted study: its search wall time cannot be measured; "
                               "remove its checkpoints folder for a fresh search")
        if m := re.search(r"\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.eE+-]+)", line):
            index = int(m.group(2))
            self.menu[int(m.group(1))] = index
            self.front[index] = {"refusals": int(m.group(3)), "n": int(m.group(4)), "kl": float(m.group(5))}
            return None
        if (m := re.search(r"\[(\d+)\] Exit program", line)) and self.menu:
            menu, self.menu = self.menu, {}
            todo = [k for k, index in sorted(menu.items()) if index not in self.saved and index not in self.failed]
            if todo:
                self.current = menu[todo[0]]
                return f"{todo[0]}\n"
            self.done = True
            return f"{m.group(1)}\n"
        if m := re.search(r"\[(\d+)\] Return to the trial selection menu", line):
            c = self.current
            if c is not None and c not in self.saved and c not in self.failed and self.pending is None:
                self.pending = c
                return f"1\n{self.path(c)}\n"
            self.pending = None
            return f"{m.group(1)}\n"
        if self.pending is not None and "Model saved to" in line:
            self.saved[self.pending] = str(self.path(self.pending))
            self.pending = None
        elif self.pending is not None and re.search(r"\bError\b", line):
            self.failed[self.pending] = line.strip()
            self.pending = None
        return None


def drive(cmd: list[str], cwd: Path, log: Path, driver: MenuDriver | None, env: dict | None = None,
          idle_s: float = 1800.0) -> tuple[int, list[tuple[float, str]]]:
    """Run ``cmd``, keep every output line with the time it arrived (monotonic; the first pair is the process
    start), echo it, and write ``driver``'s answers to its stdin (None: stdin closed at once). A process
    silent for ``idle_s`` (waiting at a menu nobody answers) is killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    lines: list[tuple[float, str]] = [(start, "")]
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdin is not None and proc.stdout is not None
    if driver is None:
        proc.stdin.close()
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(x) for x in proc.stdout] + [out.put(None)], daemon=True).start()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(f"{start:.3f} \n")
        while True:
            try:
                line = out.get(timeout=idle_s)
            except queue.Empty:
                proc.kill()
                fh.write(f"{time.monotonic():.3f} [bench] killed after {idle_s:.0f} s without output\n")
                break
            if line is None:
                break
            t = time.monotonic()
            lines.append((t, line))
            fh.write(f"{t:.3f} {line}")
            fh.flush()
            sys.stdout.write(line)
            if driver is not None and not proc.stdin.closed:
                answer = driver.feed(line)
                if answer:
                    proc.stdin.write(answer)
                    proc.stdin.flush()
                    fh.write(f"{time.monotonic():.3f} [bench] answered {answer!r}\n")
                if driver.done:
                    proc.stdin.close()
        return proc.wait(), lines


def read_logged(log: Path) -> list[tuple[float, str]]:
    """A log written by :func:`drive` → its (time, line) pairs, without the bench's own notes."""
    out = []
    for raw in log.read_text(encoding="utf-8").splitlines():
        t, _, line = raw.partition(" ")
        if not line.startswith("[bench] "):
            out.append((float(t), line))
    return out


def install_heretic(venv: Path) -> Path:
    """heretic in its own venv (torch==2.13.0 first, then heretic with torch pinned) → its console script."""
    exe = venv / "bin" / "heretic"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, HERETIC, TORCH], check=True)
    return exe


def heretic_env() -> dict:
    """COLAB_GPU=1: menus read stdin; no colour; wide lines so rich never wraps a menu line or a path."""
    return {"COLAB_GPU": "1", "PYTHONUNBUFFERED": "1", "TERM": "dumb", "NO_COLOR": "1", "COLUMNS": "400"}
