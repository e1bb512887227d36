"""Our GGUF exports in llama.cpp (issue 29, item 5): does what people actually run refuse like our HF path says?

Every GGUF we wrote had only been read back by transformers. Most people run a K-quant GGUF in llama.cpp, so
this bench takes the embedded model and a run directory and, for the unedited model, the run's default edit
(what `export` writes: the DIM direction orthogonalized out) and the search's pick (``edits/search_best``):

1. builds llama.cpp from its PyPI source distribution (``llama-cpp-python``, compiled on this machine, CPU only)
   into its own venv under --work (never our dependency; no torch there), recording version and build time;
2. copies the run directory into --work (the original is never written), saves the unedited model as the edit
   ``edits/none`` (a NoEdit: `export` has no other way to write the unedited weights) and, if the run has no
   ``search_best``, runs ``refusal-atlas search -r COPY --trials N``;
3. exports each as an f16 GGUF with our CLI (``refusal-atlas export --format gguf --quant f16``) and quantizes
   each with llama.cpp's own quantizer (``llama_model_quantize``) to Q8_0 and Q4_K_M; the embedded model's
   shipped Q4_K_M file is a fourth, untouched baseline;
4. formats every held-out prompt (JailbreakBench and harmless_test, 100 each) with the run's ChatFormatter to
   the exact text our HF path feeds the model, has llama.cpp tokenize that text (special tokens parsed, no BOS
   added) and checks its ids against the HF tokenizer's on every prompt;
5. generates greedily (temperature 0 → llama.cpp's greedy sampler, repeat penalty 1.0, 2 threads, fixed
   seed) up to --tokens new tokens, stopping at an end-of-generation token, and generates the same prompts
   with our HF path (float32, the edit as it is evaluated) at the same length;
6. judges every completion with our substring and markers judges (decoded by our tokenizer, so the texts of
   identical ids are identical), and prints refusal rates with Wilson 95% intervals, how many of the 200
   GGUF completions equal the HF path's token for token, and whether a rate differs from its HF path's beyond
   the intervals (disjoint intervals; an exact McNemar test on the paired verdicts is reported too).

Every step is resumable: finished exports, quantizations and generations (one JSONL line per prompt) are kept.
The llama.cpp side runs in the other venv as ``VENV/bin/python bench/llama_cpp.py worker ...``, so this file
imports only the standard library at module level.

    flock /work/tools/heavy.lock .venv/bin/python bench/llama_cpp.py [--run-dir runs/demo] [--work bench_out/llama_cpp]
        [--n 100] [--tokens 64] [--threads 2] [--trials 30] [--models original,default,search_best] [--install-only]
        [--json docs/results/data/llama_cpp_DATE.json] [--plot docs/img/llama_cpp_DATE.png]

About 3–4 h on 2 busy cores: the compile ~15–30 min, the search ~30 min, 10 GGUFs × 200 prompts in llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CMAKE_ARGS = "-DGGML_CUDA=off -DGGML_NATIVE=on"
MODELS = ("original", "default", "search_best")
QUANTS = ("q8_0", "q4_k_m")  # llama.cpp's own quantizer: LLAMA_FTYPE_MOSTLY_<upper>
FORMATS = ("hf_fp32", "shipped_q4_k_m", "f16", "q8_0", "q4_k_m")  # table column order
GEN_FORMATS = FORMATS[1:]  # the GGUF formats llama.cpp generates with
FORMAT_LABELS = {"hf_fp32": "HF fp32 (our path)", "shipped_q4_k_m": "shipped Q4_K_M", "f16": "GGUF f16 (ours)",
                 "q8_0": "Q8_0 (llama.cpp)", "q4_k_m": "Q4_K_M (llama.cpp)"}
DATASETS = (("jailbreakbench", "harmful"), ("harmless_test", "harmless"))
JUDGES = ("substring", "markers")
REPO = Path(__file__).resolve().parents[1]


# --- pure parts (unit-tested) ---------------------------------------------------------------------------
def rate(flags: list[bool]) -> dict:
    """{n, count, rate, ci95 (Wilson)} of a list of verdicts, as every rate of the package is reported."""
    from refusal_atlas.evaluation.stats import rate_record

    return rate_record(int(sum(flags)), len(flags))


def disjoint(a: list[float], b: list[float]) -> bool:
    """Two intervals that do not overlap: the brief's "differs beyond the intervals"."""
    return a[1] < b[0] or b[1] < a[0]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (prompts where only one side refused).
    The same 100 prompts go through both models, so the paired test is the sensitive one."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def token_check(hf: list[list[int]], llama: list[list[int]], bos: int | None = None) -> dict:
    """Compare llama.cpp's tokenization of each prompt text with the HF tokenizer's ids.

    Returns the number equal, and for the first mismatch its prompt index, the first differing position and
    a diagnosis: ``bos_added`` (llama.cpp's ids are HF's with the BOS id in front) or ``ids_differ``.
    """
    if len(hf) != len(llama):
        raise ValueError(f"{len(hf)} HF tokenizations but {len(llama)} llama.cpp ones")
    equal, first = 0, None
    for i, (a, b) in enumerate(zip(hf, llama)):
        if list(a) == list(b):
            equal += 1
        elif first is None:
            why = "bos_added" if bos is not None and list(b) == [bos, *a] else "ids_differ"
            first = {"prompt": i, "position": common_prefix(a, b), "why": why,
                     "hf": list(a)[:8] if why == "bos_added" else list(a)[max(0, common_prefix(a, b) - 2):][:8],
                     "llama": list(b)[:8] if why == "bos_added" else list(b)[max(0, common_prefix(a, b) - 2):][:8]}
    return {"n": len(hf), "equal": equal, "first_mismatch": first}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def stop_reason(ids: list[int], stop: set[int], max_new_tokens: int) -> str | None:
    """Why a greedy continuation ends now (its last token is kept, as our HF path keeps it): ``eos`` on an
    end-of-turn token, ``max_new_tokens`` at the length limit, None to go on."""
    if ids and ids[-1] in stop:
        return "eos"
    if len(ids) >= max_new_tokens:
        return "max_new_tokens"
    return None


def same_completions(hf: list[list[int]], gguf: list[list[int]]) -> dict:
    """How many continuations are identical token for token, and the mean shared leading tokens."""
    if len(hf) != len(gguf):
        raise ValueError("different prompt counts")
    same = sum(1 for a, b in zip(hf, gguf) if list(a) == list(b))
    shared = [common_prefix(a, b) for a, b in zip(hf, gguf)]
    return {"n": len(hf), "identical": same, "mean_shared_prefix": round(sum(shared) / max(1, len(shared)), 2)}


def paired(ref: list[bool], other: list[bool]) -> dict:
    """Discordant counts and the exact McNemar p of two verdict lists on the same prompts."""
    if len(ref) != len(other):
        raise ValueError("different prompt counts")
    only_ref = sum(1 for a, b in zip(ref, other) if a and not b)
    only_other = sum(1 for a, b in zip(ref, other) if b and not a)
    return {"only_hf": only_ref, "only_gguf": only_other, "mcnemar_p": round(mcnemar_exact(only_ref, only_other), 4)}


def done_keys(path: Path) -> dict[str, dict]:
    """The finished lines of a generation JSONL (a torn last line from a kill is ignored) by key."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("token_ids"), list):
            out[rec["key"]] = rec
    return out


def build_rows(cells: dict[tuple[str, str], dict], judge: str = "substring") -> list[dict]:
    """Table rows (model × format, in MODELS × FORMATS order, present cells only) from per-cell results
    ``{(model, fmt): {"rates": {judge: {"harmful": rate, "harmless": rate}}, "vs_hf": {...} | None}}``.

    A GGUF cell whose harmful or harmless rate has an interval disjoint from its model's HF fp32 interval is
    flagged ``beyond_ci`` (a bug by the issue's rule)."""
    rows = []
    models = [m for m in MODELS if any(k[0] == m for k in cells)] + sorted({k[0] for k in cells} - set(MODELS))
    for model in models:
        ref = cells.get((model, "hf_fp32"))
        for fmt in FORMATS:
            cell = cells.get((model, fmt))
            if cell is None:
                continue
            r = cell["rates"][judge]
            row = {"model": model, "format": fmt, "harmful": r["harmful"], "harmless": r["harmless"],
                   "identical": None, "beyond_ci": None}
            if fmt != "hf_fp32" and ref is not None:
                rr = ref["rates"][judge]
                row["beyond_ci"] = any(disjoint(r[side]["ci95"], rr[side]["ci95"]) for side in ("harmful", "harmless"))
                vs = cell.get("vs_hf") or {}
                if vs:
                    row["identical"] = sum(v["identical"] for v in vs.values())
                    row["identical_of"] = sum(v["n"] for v in vs.values())
            rows.append(row)
    return rows


def fmt_rate(r: dict) -> str:
    return f"{r['rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def markdown_table(rows: list[dict]) -> str:
    """The results table as Markdown: model, format, harmful and harmless refusal [CI], identical to HF."""
    lines = ["| model | format | harmful refusal [95% CI] | harmless refusal [95% CI] | identical to HF path | "
             "beyond HF's CI |", "|---|---|---|---|---|---|"]
    for r in rows:
        same = "–" if r["identical"] is None else f"{r['identical']}/{r['identical_of']}"
        flag = "–" if r["beyond_ci"] is None else ("**yes**" if r["beyond_ci"] else "no")
        lines.append(f"| {r['model']} | {FORMAT_LABELS.get(r['format'], r['format'])} | {fmt_rate(r['harmful'])} | "
                     f"{fmt_rate(r['harmless'])} | {same} | {flag} |")
    return "\n".join(lines)


def load_table(meta: dict[str, dict], failed: dict[str, str]) -> str:
    """Markdown: per GGUF whether llama.cpp loaded it, what it read, and whether it tokenized every prompt text
    to the HF path's ids (``--check-only``: no generation, so it needs no heavy-job slot)."""
    lines = ["| GGUF | loads | llama.cpp's description | file bytes | load s | prompts tokenized as HF | "
             "BOS added | end-of-turn is EOG | chat template equal |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in sorted(set(meta) | set(failed), key=lambda c: (c.split("-")[0] != "original", c)):
        if cell in failed:
            lines.append(f"| {cell} | **no**: {failed[cell]} | – | – | – | – | – | – | – |")
            continue
        md = meta[cell]
        tk = md["tokens"]
        lines.append(f"| {cell} | yes | {md['desc']} | {md.get('file_bytes', '–')} | {md['load_s']} | "
                     f"{tk['equal']}/{tk['n']} | {'yes' if md['add_bos'] else 'no'} | "
                     f"{'yes' if md['eog_in_stop'] else '**no**'} | {'yes' if md['chat_template_equal'] else '**no**'} |")
    return "\n".join(lines)


def build_versions(log: Path) -> dict:
    """llama.cpp's and ggml's versions as its CMake configure step printed them into the build log."""
    out = {}
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        for name in ("llama.cpp", "ggml"):
            tag = f"-- {name} version:"
            if tag in line:
                out[name] = line.split(tag, 1)[1].strip()
    return out


def stop_by_epoch(hhmm: str | None, now: float) -> float | None:
    """``--stop-by HH:MM`` (UTC) as epoch seconds: that time today, or tomorrow if it has passed (None: no limit).
    A shared machine gives no guaranteed finish time; past it no new llama.cpp prompt starts, so a run still
    ends with a table of the cells it finished, and names the ones it did not."""
    if not hhmm:
        return None
    try:
        hour, minute = (int(x) for x in hhmm.split(":"))
    except ValueError:
        raise ValueError(f"--stop-by wants HH:MM (UTC), got {hhmm!r}") from None
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise ValueError(f"--stop-by wants HH:MM (UTC), got {hhmm!r}")
    day = now - now % 86400
    at = day + hour * 3600 + minute * 60
    return at if at > now else at + 86400


def gguf_cells(models: list[str], have_shipped: bool) -> list[tuple[str, str]]:
    """(model, format) of every GGUF to run in llama.cpp: each model at f16 and the two llama.cpp quants, and
    the shipped Q4_K_M file as the original's baseline."""
    cells = [(m, f) for m in models for f in ("f16", *QUANTS)]
    return ([("original", "shipped_q4_k_m")] if have_shipped and "original" in models else []) + cells


# --- the llama.cpp side (runs in its own venv) ----------------------------------------------------------
def install_llama_cpp(venv: Path, log: Path) -> dict:
    """llama-cpp-python compiled from its PyPI source distribution into its own venv (no torch there);
    returns {version, build_s, ...}, kept in ``venv/build.json`` so a rerun skips the compile."""
    record = venv / "build.json"
    if record.is_file():
        return json.loads(record.read_text())
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
           "FORCE_CMAKE": "1"}
    t0 = time.monotonic()
    with open(log, "w") as fh:
        subprocess.run([py, "-m", "pip", "install", "-v", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                        LLAMA_CPP_PYTHON], check=True, env=env, stdout=fh, stderr=subprocess.STDOUT)
    build_s = time.monotonic() - t0
    info = json.loads(subprocess.run([py, "-c", "import json, llama_cpp; print(json.dumps({'version': llama_cpp.__version__, "
                                      "'system_info': llama_cpp.llama_print_system_info().decode()}))"],
                                     check=True, capture_output=True, text=True).stdout)
    out = {**info, "package": LLAMA_CPP_PYTHON, "cmake_args": CMAKE_ARGS, "build_s": round(build_s, 1),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    record.write_text(json.dumps(out, indent=1))
    return out


def worker_quantize(src: str, dst: str, qtype: str, threads: int) -> None:
    """llama.cpp's quantizer (the one `llama-quantize` calls) with its default parameters: f16 → ``qtype``."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = threads
    tmp = dst + ".part"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        Path(tmp).unlink(missing_ok=True)
        raise SystemExit(f"error: llama_model_quantize({src} → {qtype}) returned {rc}")
    os.replace(tmp, dst)


def worker_generate(spec_path: str, out_path: str) -> None:
    """Greedy continuations of every prompt in the spec not yet in ``out_path`` (one flushed line each)."""
    import llama_cpp

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out, meta_path = Path(out_path), Path(out_path).with_suffix(".meta.json")
    t0 = time.monotonic()
    try:
        llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=spec["n_ctx"], n_batch=spec["n_ctx"],
                              n_threads=spec["threads"], n_threads_batch=spec["threads"], seed=spec["seed"],
                              verbose=True)
    except Exception as exc:  # llama.cpp's own message is on stderr (the worker log); this is the Python side
        meta_path.write_text(json.dumps({"load_error": f"{type(exc).__name__}: {exc}"}))
        raise SystemExit(f"error: llama.cpp cannot load {spec['model']}: {exc}")
    load_s = time.monotonic() - t0
    vocab = llm._model.vocab
    stop = set(spec["stop_ids"])
    llama_ids = [llm.tokenize(p["text"].encode("utf-8"), add_bos=False, special=True) for p in spec["prompts"]]
    md = llm.metadata
    meta = {"load_s": round(load_s, 2), "n_vocab": llm.n_vocab(), "bos": llm.token_bos(), "eos": llm.token_eos(),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            "eog_in_stop": sorted(t for t in stop if llama_cpp.llama_vocab_is_eog(vocab, t)),
            "desc": llm._model.desc(), "n_params": llm._model.n_params(), "size": llm._model.size(),
            "gguf_add_bos_key": md.get("tokenizer.ggml.add_bos_token"),
            "chat_template_equal": md.get("tokenizer.chat_template") == spec.get("chat_template"),
            "tokens": token_check([p["hf_ids"] for p in spec["prompts"]], llama_ids, llm.token_bos()),
            "llama_cpp": llama_cpp.__version__}
    meta_path.write_text(json.dumps(meta, indent=1))
    if spec.get("check_only"):
        return
    have = done_keys(out)
    with open(out, "a", encoding="utf-8") as fh:
        for p, ids in zip(spec["prompts"], llama_ids):
            if p["key"] in have:
                continue
            if spec.get("stop_by") is not None and time.time() > spec["stop_by"]:
                break  # past --stop-by: the cell stays unfinished (resumable) and is left out of the table
            llm.reset()  # no prefix reuse from the previous prompt: each prompt is evaluated whole, alone
            t = time.monotonic()
            toks: list[int] = []
            why = None
            for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0,
                                    repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, reset=True):
                toks.append(int(tok))
                eog = llama_cpp.llama_vocab_is_eog(vocab, int(tok))
                why = stop_reason(toks, stop | ({int(tok)} if eog else set()), spec["max_new_tokens"])
                if why:
                    break
            fh.write(json.dumps({"key": p["key"], "prompt_ids_equal": ids == p["hf_ids"], "token_ids": toks,
                                 "stop": why, "seconds": round(time.monotonic() - t, 3)}) + "\n")
            fh.flush()


# --- our side (the project's venv) ----------------------------------------------------------------------
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "refusal_atlas.cli", *args]


def contention() -> dict:
    """What else the machine was doing: load averages and the top CPU users."""
    top = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": list(os.getloadavg()),
            "top": [line[:160] for line in top.splitlines()[1:6]]}


def prepare_run(src: Path, copy: Path) -> Path:
    """A private copy of the run directory: export, evaluate and search all write into their run."""
    if not (copy / "manifest.json").is_file():
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(src, copy)
    return copy


def save_edits(run: Path) -> None:
    """``edits/none`` (the unedited model, so `export --edit none` writes the unedited weights)."""
    from refusal_atlas.edits import NoEdit

    if not (run / "edits" / "none.json").is_file():
        (run / "edits").mkdir(exist_ok=True)
        NoEdit(name="none").save(run / "edits" / "none")


def run_edit(run: Path, model: str):
    """The edit each model row means, exactly as export and our HF path take it."""
    from refusal_atlas.core.io import read_json
    from refusal_atlas.edits import load_run_edit
    from refusal_atlas.workflows.export import chosen_edit

    if model == "default":
        return chosen_edit(run, read_json(run / "manifest.json"), "dim", None)[0]
    return load_run_edit(run, "none" if model == "original" else model)


def export_f16(run: Path, model: str, dest: Path, log: dict) -> Path:
    """Our CLI's f16 GGUF export of ``model`` (skipped when ``dest/model.gguf`` exists)."""
    gguf = dest / "model.gguf"
    if gguf.is_file():
        return gguf
    args = ["export", "-r", str(run), "--format", "gguf", "--quant", "f16", "--out", str(dest), "--force"]
    if model != "default":
        args += ["--edit", "none" if model == "original" else model]
    t0 = time.monotonic()
    subprocess.run(cli(*args), check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    log[f"export_{model}_f16_s"] = round(time.monotonic() - t0, 1)
    return gguf


def shipped_gguf(dest: Path) -> Path | None:
    """The embedded model's own Q4_K_M file, assembled from its wheels (None if they are not installed)."""
    from refusal_atlas.core.errors import ModelError
    from refusal_atlas.model.embedded import assemble_gguf, part_paths

    if dest.is_file():
        return dest
    try:
        return assemble_gguf(part_paths(), dest)
    except ModelError as exc:
        print(f"no shipped GGUF: {exc}")
        return None


def worker(venv: Path, *args: str, log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as fh:
        # -P: no script directory on sys.path, or `import llama_cpp` would import this file (bench/llama_cpp.py)
        return subprocess.run([str(venv / "bin" / "python"), "-P", str(Path(__file__).resolve()), "worker", *args],
                              stdout=fh, stderr=subprocess.STDOUT)


def last_error(log: Path) -> str:
    """The llama.cpp log lines that say what went wrong (error/failed), for the report."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    bad = [line for line in lines if any(w in line.lower() for w in ("error", "failed", "invalid"))]
    return "\n".join((bad or lines)[-6:])


def prompt_specs(chat, prompts_by_set: dict[str, list]) -> list[dict]:
    """Every prompt as the exact text our HF path renders and the ids it feeds the model (keyed set/index)."""
    out = []
    for name, prompts in prompts_by_set.items():
        texts = [chat.render(p.instruction) for p in prompts]
        ids = chat.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out += [{"key": f"{name}/{i}", "text": t, "hf_ids": list(x)} for i, (t, x) in enumerate(zip(texts, ids))]
    return out


def judge_all(prompts_by_set: dict[str, list], responses: dict[str, str]) -> dict:
    """{judge: {role: rate, "verdicts": {key: bool}}} of responses keyed like prompt_specs."""
    from refusal_atlas.evaluation.judges import JudgeItem, MarkersJudge, SubstringJudge

    out = {}
    for jname, judge in (("substring", SubstringJudge()), ("markers", MarkersJudge())):
        res: dict = {"verdicts": {}}
        for name, role in DATASETS:
            keys = [f"{name}/{i}" for i in range(len(prompts_by_set[name]))]
            items = [JudgeItem(p.instruction, responses[k]) for p, k in zip(prompts_by_set[name], keys)]
            flags = [v.refused for v in judge.judge(items, role)]
            res[role] = rate(flags)
            res["verdicts"].update(dict(zip(keys, flags)))
        out[jname] = res
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Harmful and harmless refusal with intervals, per model and format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
    labels = [f"{r['model']}\n{r['format']}" for r in rows]
    colours = {"hf_fp32": "#333333", "shipped_q4_k_m": "#999999", "f16": "#1f77b4", "q8_0": "#2ca02c",
               "q4_k_m": "#d62728"}
    for ax, side in zip(axes, ("harmful", "harmless")):
        for i, r in enumerate(rows):
            v = r[side]
            ax.errorbar(i, v["rate"], yerr=[[v["rate"] - v["ci95"][0]], [v["ci95"][1] - v["rate"]]], fmt="o",
                        color=colours.get(r["format"], "k"), capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=70, fontsize=7)
        ax.set_title(f"{side} refusal (substring, 95% Wilson)")
        ax.set_ylim(-0.02, 1.0 if side == "harmful" else 0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def check_only(args, work: Path, ggufs: dict, models: list[str], have_shipped: bool, specs: list[dict], seed: int,
               stop: list[int], chat_template: str | None, venv: Path, build: dict, problems: list[str],
               started: dict) -> None:
    """Every GGUF loaded in llama.cpp and every prompt text tokenized there, against the HF ids; no generation."""
    meta, failed = {}, {}
    for m, fmt in gguf_cells(models, have_shipped):
        if (m, fmt) not in ggufs:
            continue
        cell = f"{m}-{fmt}"
        (work / "check").mkdir(parents=True, exist_ok=True)
        spec_path, out = work / "check" / f"{cell}.spec.json", work / "check" / f"{cell}.jsonl"
        out.with_suffix(".meta.json").unlink(missing_ok=True)
        spec_path.write_text(json.dumps({"model": str(ggufs[(m, fmt)].resolve()), "n_ctx": args.n_ctx,
                                         "threads": args.threads, "seed": seed, "max_new_tokens": args.tokens,
                                         "stop_ids": stop, "chat_template": chat_template, "prompts": specs,
                                         "check_only": True}), encoding="utf-8")
        res = worker(venv, "generate", str(spec_path), str(out), log=work / "check" / f"{cell}.log")
        if res.returncode != 0 or not out.with_suffix(".meta.json").is_file():
            failed[cell] = last_error(work / "check" / f"{cell}.log").replace("\n", " / ")[:200]
            problems.append(f"llama.cpp cannot load {cell}: {failed[cell]}")
            continue
        meta[cell] = {**json.loads(out.with_suffix(".meta.json").read_text()),
                      "file_bytes": ggufs[(m, fmt)].stat().st_size}
        if meta[cell]["tokens"]["equal"] != meta[cell]["tokens"]["n"]:
            problems.append(f"{cell}: llama.cpp tokenized {meta[cell]['tokens']['n'] - meta[cell]['tokens']['equal']} "
                            f"prompts differently: {meta[cell]['tokens']['first_mismatch']}")
    table = load_table(meta, failed)
    print(f"\nllama.cpp load and tokenization check, {len(specs)} prompt texts:")
    print(table)
    result = {"command": " ".join(sys.argv), "check_only": True, "llama_cpp": build,
              "machine": {"processor": platform.processor(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "settings": {"n": args.n, "n_ctx": args.n_ctx, "threads": args.threads, "seed": seed, "stop_ids": stop,
                           "run_dir": args.run_dir, "models": models},
              "llama_meta": meta, "load_failed": failed, "table": table, "problems": problems,
              "contention": {"start": started, "end": contention()}}
    (work / "check.json").write_text(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("\nproblems:" if problems else "\nno problems found", *problems, sep="\n  ")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kind, *rest = sys.argv[2:]
        if kind == "quantize":
            worker_quantize(rest[0], rest[1], rest[2], int(rest[3]))
        else:
            worker_generate(rest[0], rest[1])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/demo", help="read only: copied into --work first")
    ap.add_argument("--work", default="bench_out/llama_cpp")
    ap.add_argument("--venv", default=None, help="llama.cpp's venv (default WORK/venv; built there when missing)")
    ap.add_argument("--n", type=int, default=100, help="prompts per held-out set")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per completion (both paths)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=30, help="search trials when the run has no search_best")
    ap.add_argument("--no-search", action="store_true", help="leave search_best out if the run has none")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--formats", default=",".join(GEN_FORMATS),
                    help="GGUF formats that may generate in llama.cpp now (the others only report their saved "
                         "completions): lets a short slot finish the formats that matter first")
    ap.add_argument("--install-only", action="store_true")
    ap.add_argument("--check-only", action="store_true",
                    help="only load every GGUF in llama.cpp and check its tokenization of every prompt (no generation)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--stop-by", default=None, metavar="HH:MM",
                    help="UTC time after which no llama.cpp prompt starts; unfinished cells are left out and named")
    args = ap.parse_args()
    try:
        stop_by = stop_by_epoch(args.stop_by, time.time())
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - set(GEN_FORMATS):
        raise SystemExit(f"error: --formats takes some of {','.join(GEN_FORMATS)}, got {args.formats!r}")
    # OpenMP threads that spin while waiting collapse on a shared, oversubscribed machine (2 cores, load ~13 on
    # 2026-12-07: llama.cpp at 2 threads 58 s → 5 s for 2 prompts, torch generation 105 s → 18 s); passive
    # waiting changes no arithmetic (same tokens). Set before torch or llama.cpp loads; inherited by children.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = contention()
    timings: dict = {}
    venv = Path(args.venv) if args.venv else work / "venv"
    build = install_llama_cpp(venv, venv.parent / "build.log")
    build.update(build_versions(venv.parent / "build.log"))
    print(f"llama-cpp-python {build['version']} (llama.cpp {build.get('llama.cpp')}, ggml {build.get('ggml')}): "
          f"built in {build['build_s']:.0f} s")
    if args.install_only:
        return
    run = prepare_run(Path(args.run_dir), work / "run")
    save_edits(run)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "search_best" in models and not (run / "edits" / "search_best.json").is_file():
        if args.no_search:
            models.remove("search_best")
        else:
            t0 = time.monotonic()
            subprocess.run(cli("search", "-r", str(run), "--trials", str(args.trials)), check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
            timings["search_s"] = round(time.monotonic() - t0, 1)

    # GGUF files: our f16 exports, llama.cpp's quantizations of them, the shipped original
    ggufs: dict[tuple[str, str], Path] = {}
    problems: list[str] = []
    for m in models:
        ggufs[(m, "f16")] = export_f16(run, m, work / "gguf" / f"{m}-f16", timings)
        for q in QUANTS:
            dst = work / "gguf" / f"{m}-{q}.gguf"
            if not dst.is_file():
                t0 = time.monotonic()
                res = worker(venv, "quantize", str(ggufs[(m, "f16")]), str(dst), q, str(args.threads),
                             log=work / "gguf" / f"{m}-{q}.log")
                if res.returncode != 0:
                    problems.append(f"quantize {m} → {q} failed: {last_error(work / 'gguf' / f'{m}-{q}.log')}")
                    continue
                timings[f"quantize_{m}_{q}_s"] = round(time.monotonic() - t0, 1)
            ggufs[(m, q)] = dst
    shipped = shipped_gguf(work / "gguf" / "original-shipped-q4_k_m.gguf")
    if shipped is not None and "original" in models:
        ggufs[("original", "shipped_q4_k_m")] = shipped

    # prompts, the HF path
    from refusal_atlas.data import load_prompts
    from refusal_atlas.evaluation.completions import completions_for
    from refusal_atlas.model.generation import stop_token_ids
    from refusal_atlas.workflows.workspace import reopen_workspace

    ws = reopen_workspace(run)
    seed = ws.settings.data.seed
    prompts = {name: load_prompts(name, n=args.n, seed=seed) for name, _ in DATASETS}
    specs = prompt_specs(ws.chat, prompts)
    stop = stop_token_ids(ws.adapter.model, ws.chat.tokenizer)
    tok = ws.chat.tokenizer
    if args.check_only:
        check_only(args, work, ggufs, models, shipped is not None, specs, seed, stop, tok.chat_template, venv, build,
                   problems, started)
        return
    completions: dict[tuple[str, str], dict[str, list[int]]] = {}
    for m in models:
        edit = run_edit(run, m)
        ids: dict[str, list[int]] = {}
        t0, fresh = time.monotonic(), 0
        for name, _ in DATASETS:
            comp = completions_for(ws.adapter, ws.chat, prompts[name], edit, args.tokens,
                                   ws.settings.evaluation.generation_batch_size, work / "hf" / m / f"{name}.jsonl",
                                   desc=f"HF {m} {name}")
            ids.update({f"{name}/{i}": t for i, t in enumerate(comp.token_ids)})
            fresh += len(prompts[name]) - comp.reused
        if fresh:  # only time what ran now (a resumed run reuses saved completions)
            timings[f"hf_{m}_s"] = {"seconds": round(time.monotonic() - t0, 1), "generated": fresh}
        completions[(m, "hf_fp32")] = ids

    # llama.cpp generation
    meta: dict[str, dict] = {}
    for m, fmt in gguf_cells(models, shipped is not None):
        if (m, fmt) not in ggufs:
            continue
        cell = f"{m}-{fmt}"
        out = work / "gen" / f"{cell}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        spec = {"model": str(ggufs[(m, fmt)].resolve()), "n_ctx": args.n_ctx, "threads": args.threads, "seed": seed,
                "max_new_tokens": args.tokens, "stop_ids": stop, "stop_by": stop_by, "chat_template": tok.chat_template,
                "prompts": specs}
        spec_path = work / "gen" / f"{cell}.spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        unfinished = len(done_keys(out)) < len(specs) or not out.with_suffix(".meta.json").is_file()
        if unfinished and fmt in formats and (stop_by is None or time.time() < stop_by):
            t0 = time.monotonic()
            res = worker(venv, "generate", str(spec_path), str(out), log=work / "gen" / f"{cell}.log")
            if res.returncode != 0:
                problems.append(f"llama.cpp on {cell}: {last_error(work / 'gen' / f'{cell}.log')}")
                continue
            timings[f"llama_{cell}_s"] = round(time.monotonic() - t0, 1)
        lines = done_keys(out)
        if len(lines) < len(specs) or not out.with_suffix(".meta.json").is_file():
            why = f"--stop-by {args.stop_by} came" if fmt in formats else f"not in --formats {args.formats}:"
            problems.append(f"{cell}: not measured: {why} after {len(lines)} of "
                            f"{len(specs)} prompts (resumable: rerun the same command)")
            continue
        meta[cell] = json.loads(out.with_suffix(".meta.json").read_text())
        completions[(m, fmt)] = {k: lines[k]["token_ids"] for k in lines}
        meta[cell]["generated_tokens"] = sum(len(v["token_ids"]) for v in lines.values())
        meta[cell]["generate_s"] = round(sum(v["seconds"] for v in lines.values()), 1)
        meta[cell]["file_bytes"] = ggufs[(m, fmt)].stat().st_size

    # judge, compare
    keys = [s["key"] for s in specs]
    cells: dict[tuple[str, str], dict] = {}
    for (m, fmt), ids in completions.items():
        responses = {k: tok.decode(ids[k], skip_special_tokens=True).strip() for k in keys}
        judged = judge_all(prompts, responses)
        cell = {"rates": {j: {r: judged[j][r] for _, r in DATASETS} for j in JUDGES}, "verdicts": judged}
        ref = completions.get((m, "hf_fp32"))
        if fmt != "hf_fp32" and ref is not None:
            cell["vs_hf"] = {name: same_completions([ref[f"{name}/{i}"] for i in range(len(prompts[name]))],
                                                    [ids[f"{name}/{i}"] for i in range(len(prompts[name]))])
                             for name, _ in DATASETS}
        cells[(m, fmt)] = cell
    for (m, fmt), cell in cells.items():
        ref = cells.get((m, "hf_fp32"))
        if fmt != "hf_fp32" and ref is not None:
            cell["paired"] = {j: {role: paired([ref["verdicts"][j]["verdicts"][f"{name}/{i}"] for i in range(args.n)],
                                               [cell["verdicts"][j]["verdicts"][f"{name}/{i}"] for i in range(args.n)])
                                  for name, role in DATASETS} for j in JUDGES}
    rows = {j: build_rows(cells, j) for j in JUDGES}
    for j in JUDGES:
        print(f"\n{j} judge, {args.n} + {args.n} prompts, {args.tokens} new tokens:")
        print(markdown_table(rows[j]))
    for j in JUDGES:
        for r in rows[j]:
            if r["beyond_ci"]:
                problems.append(f"{r['model']} {r['format']} ({j}): refusal outside the HF path's interval")
    for cell, md in meta.items():
        if md["tokens"]["equal"] != md["tokens"]["n"]:
            problems.append(f"{cell}: llama.cpp tokenized {md['tokens']['n'] - md['tokens']['equal']} prompts differently: "
                            f"{md['tokens']['first_mismatch']}")
    result = {"command": " ".join(sys.argv), "llama_cpp": build, "machine": {"processor": platform.processor(),
              "cpus": os.cpu_count(), "platform": platform.platform()},
              "settings": {"n": args.n, "tokens": args.tokens, "threads": args.threads, "n_ctx": args.n_ctx,
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "stop_by": args.stop_by,
                           "seed": seed, "stop_ids": stop, "run_dir": args.run_dir, "models": models},
              "rows": rows, "cells": {f"{m}|{f}": {k: v for k, v in c.items() if k != "verdicts"}
                                      for (m, f), c in cells.items()},
              "llama_meta": meta, "timings_s": timings, "problems": problems,
              "contention": {"start": started, "end": contention()}}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows["substring"], Path(args.plot))
    print("\nproblems:" if problems else "\nno problems found", *problems, sep="\n  ")


if __name__ == "__main__":
    main()
