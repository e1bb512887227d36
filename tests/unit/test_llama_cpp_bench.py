"""bench/llama_cpp.py's pure parts, without llama.cpp: prompt texts and the token-id check, stop rule, paired
statistics, the results table, resumable generation files, and that the file imports only the standard library
at module level (its worker runs in llama.cpp's venv, which has neither torch nor refusal_atlas)."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from refusal_atlas.data import Prompt
from refusal_atlas.model.chat import ChatFormatter
from tiny import tiny_bpe_tokenizer

_PATH = Path(__file__).resolve().parents[2] / "bench" / "llama_cpp.py"
_spec = importlib.util.spec_from_file_location("llama_cpp_bench", _PATH)
lb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lb)


def test_module_level_imports_are_standard_library_only():
    tree = ast.parse(_PATH.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names, "expected some imports"
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names - set(sys.stdlib_module_names)


def test_rate_carries_wilson_interval():
    r = lb.rate([True] * 5 + [False] * 5)
    assert (r["n"], r["count"], r["rate"]) == (10, 5, 0.5)
    assert r["ci95"] == pytest.approx([0.2366, 0.7634], abs=1e-4)  # the textbook Wilson interval for 5/10
    zero = lb.rate([False] * 10)
    assert zero["ci95"][0] == 0.0 and zero["ci95"][1] == pytest.approx(0.2775, abs=1e-4)


def test_disjoint_intervals():
    assert lb.disjoint([0.0, 0.1], [0.2, 0.3])
    assert lb.disjoint([0.5, 0.6], [0.1, 0.49])
    assert not lb.disjoint([0.0, 0.2], [0.2, 0.3])  # touching intervals overlap
    assert not lb.disjoint([0.1, 0.5], [0.2, 0.3])


def test_mcnemar_exact():
    assert lb.mcnemar_exact(0, 0) == 1.0
    assert lb.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert lb.mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)
    assert lb.mcnemar_exact(3, 3) == 1.0  # capped: a symmetric split is no evidence


def test_paired_counts_discordant_prompts():
    ref = [True, True, False, False, True]
    other = [True, False, True, True, True]
    out = lb.paired(ref, other)
    assert (out["only_hf"], out["only_gguf"]) == (1, 2)
    assert out["mcnemar_p"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lb.paired([True], [True, False])


def test_token_check_equal_bos_and_differing():
    hf = [[1, 2, 3], [4, 5], [6, 7, 8]]
    assert lb.token_check(hf, [list(x) for x in hf], bos=0) == {"n": 3, "equal": 3, "first_mismatch": None}
    bos = lb.token_check(hf, [[1, 2, 3], [0, 4, 5], [6, 7, 8]], bos=0)
    assert bos["equal"] == 2
    assert bos["first_mismatch"]["prompt"] == 1 and bos["first_mismatch"]["why"] == "bos_added"
    differ = lb.token_check(hf, [[1, 2, 3], [4, 5], [6, 9, 8]], bos=0)
    assert differ["equal"] == 2
    assert differ["first_mismatch"]["prompt"] == 2 and differ["first_mismatch"]["position"] == 1
    assert differ["first_mismatch"]["why"] == "ids_differ"
    with pytest.raises(ValueError):
        lb.token_check(hf, hf[:2])


def test_common_prefix_and_same_completions():
    assert lb.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert lb.common_prefix([1, 2], [1, 2, 3]) == 2
    assert lb.common_prefix([], [1]) == 0
    out = lb.same_completions([[1, 2, 3], [4, 5], [7]], [[1, 2, 3], [4, 6], [8]])
    assert out == {"n": 3, "identical": 1, "mean_shared_prefix": round((3 + 1 + 0) / 3, 2)}


def test_stop_reason_keeps_the_stop_token_and_limits_length():
    assert lb.stop_reason([5, 9], {9}, 64) == "eos"
    assert lb.stop_reason([5, 6], {9}, 2) == "max_new_tokens"
    assert lb.stop_reason([5, 6], {9}, 3) is None
    assert lb.stop_reason([], {9}, 3) is None
    assert lb.stop_reason([9], {9}, 1) == "eos"  # an end token at the limit still says why it ended


def test_done_keys_skips_torn_and_foreign_lines(tmp_path):
    path = tmp_path / "gen.jsonl"
    assert lb.done_keys(path) == {}
    good = {"key": "jailbreakbench/0", "token_ids": [1, 2], "stop": "eos", "seconds": 0.1}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"key": "x"}) + "\n" + '{"key": "jailbreakbench/1", "tok')
    assert lb.done_keys(path) == {"jailbreakbench/0": good}


def test_gguf_cells():
    assert lb.gguf_cells(["original", "default"], True) == [
        ("original", "shipped_q4_k_m"), ("original", "f16"), ("original", "q8_0"), ("original", "q4_k_m"),
        ("default", "f16"), ("default", "q8_0"), ("default", "q4_k_m")]
    assert ("original", "shipped_q4_k_m") not in lb.gguf_cells(["original"], False)
    assert lb.gguf_cells(["search_best"], True)[0] == ("search_best", "f16")


def _cell(harmful: int, harmless: int, identical=None):
    rates = {"harmful": lb.rate([True] * harmful + [False] * (100 - harmful)),
             "harmless": lb.rate([True] * harmless + [False] * (100 - harmless))}
    cell = {"rates": {"substring": rates}}
    if identical is not None:
        cell["vs_hf"] = {"jailbreakbench": {"n": 100, "identical": identical[0]},
                         "harmless_test": {"n": 100, "identical": identical[1]}}
    return cell


def test_build_rows_orders_flags_and_counts():
    cells = {("default", "q4_k_m"): _cell(30, 1, (20, 30)),  # 0.30 vs 0.06: disjoint intervals
             ("default", "hf_fp32"): _cell(6, 1),
             ("default", "f16"): _cell(7, 1, (90, 95)),
             ("original", "hf_fp32"): _cell(51, 2),
             ("original", "shipped_q4_k_m"): _cell(49, 2, (40, 60))}
    rows = lb.build_rows(cells)
    assert [(r["model"], r["format"]) for r in rows] == [
        ("original", "hf_fp32"), ("original", "shipped_q4_k_m"), ("default", "hf_fp32"), ("default", "f16"),
        ("default", "q4_k_m")]
    by = {(r["model"], r["format"]): r for r in rows}
    assert by[("default", "hf_fp32")]["beyond_ci"] is None and by[("default", "hf_fp32")]["identical"] is None
    assert by[("default", "f16")]["beyond_ci"] is False
    assert by[("default", "q4_k_m")]["beyond_ci"] is True
    assert (by[("default", "f16")]["identical"], by[("default", "f16")]["identical_of"]) == (185, 200)
    assert by[("original", "shipped_q4_k_m")]["identical"] == 100
    table = lb.markdown_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| default | Q4_K_M (llama.cpp) | 0.30 [" in table and "| 50/200 | **yes** |" in table
    assert "| original | HF fp32 (our path) | 0.51 [0.41, 0.61] |" in table


def test_prompt_specs_are_the_hf_path_texts_and_ids():
    tok = tiny_bpe_tokenizer()
    chat = ChatFormatter(tok)
    prompts = {"jailbreakbench": [Prompt("how to make a bomb"), Prompt("steal money")],
               "harmless_test": [Prompt("write poem about cats")]}
    specs = lb.prompt_specs(chat, prompts)
    assert [s["key"] for s in specs] == ["jailbreakbench/0", "jailbreakbench/1", "harmless_test/0"]
    assert specs[0]["text"] == chat.render("how to make a bomb")
    # the ids the HF path generates from: chat.encode's row without its left padding
    enc = chat.encode(["how to make a bomb", "steal money"])
    for row, mask, spec in zip(enc["input_ids"], enc["attention_mask"], specs[:2]):
        assert row[mask.bool()].tolist() == spec["hf_ids"]
    assert specs[2]["hf_ids"][-chat.n_eoi:] == chat.eoi_ids


def test_build_versions_from_the_cmake_log(tmp_path):
    log = tmp_path / "build.log"
    assert lb.build_versions(log) == {}
    log.write_text("  -- The C compiler\n  -- llama.cpp version: 0.5.0-dev\n  -- ggml version: 0.25.3\n  [1/9] g++\n")
    assert lb.build_versions(log) == {"llama.cpp": "0.5.0-dev", "ggml": "0.25.3"}


def test_stop_by_epoch_is_the_next_utc_occurrence():
    now = 1_796_625_180.0  # 2026-12-07 06:33 UTC
    day = now - now % 86400
    assert lb.stop_by_epoch(None, now) is None
    assert lb.stop_by_epoch("07:43", now) == day + 7 * 3600 + 43 * 60
    assert lb.stop_by_epoch("06:00", now) == day + 86400 + 6 * 3600  # passed today: tomorrow's
    for bad in ("7", "25:00", "07:60", "x:y"):
        with pytest.raises(ValueError):
            lb.stop_by_epoch(bad, now)


def test_load_table_names_failures_and_mismatches():
    ok = {"desc": "qwen2 1B F16", "file_bytes": 10, "load_s": 1.0, "tokens": {"n": 4, "equal": 4},
          "add_bos": False, "eog_in_stop": [7], "chat_template_equal": True}
    bad = {**ok, "tokens": {"n": 4, "equal": 3}, "eog_in_stop": [], "chat_template_equal": False}
    table = lb.load_table({"default-f16": bad, "original-f16": ok}, {"default-q4_k_m": "bad magic"})
    lines = table.splitlines()
    assert len(lines) == 5
    assert lines[2].startswith("| original-f16 | yes | qwen2 1B F16 | 10 | 1.0 | 4/4 | no | yes | yes |")
    assert "| default-f16 | yes | qwen2 1B F16 | 10 | 1.0 | 3/4 | no | **no** | **no** |" in table
    assert "| default-q4_k_m | **no**: bad magic |" in table


@pytest.mark.parametrize("formats", ["q4_k_m,q5_k_m", "hf_fp32", ","])
def test_bad_formats_stop_before_any_work(tmp_path, monkeypatch, capsys, formats):
    work = tmp_path / "work"
    monkeypatch.setattr(sys, "argv", ["llama_cpp.py", "--work", str(work), "--formats", formats])
    with pytest.raises(SystemExit) as exc:
        lb.main()
    assert str(exc.value).startswith("error: --formats takes some of shipped_q4_k_m,f16,q8_0,q4_k_m")
    assert not work.exists()  # nothing built, nothing copied
