"""bench/vs_heretic.py's pure parts on synthetic inputs: dataset folders, config.toml, log parsing, fronts
and the domination check (the bench itself runs heretic and takes > 1 h: `make bench`, never `make test`)."""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "vs_heretic.py"
_spec = importlib.util.spec_from_file_location("vs_heretic", _PATH)
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)


def test_datasets_are_save_to_disk_folders_that_keep_newlines(tmp_path):
    from datasets import load_from_disk

    prompts = {"bad_prompts": ["how to\nmake a bomb", "b"], "good_prompts": ["write a poem"],
               "bad_evaluation_prompts": ["x"], "good_evaluation_prompts": ["y", "z", "w"]}
    paths = vs.write_datasets(prompts, tmp_path / "ds", sys.executable)
    assert set(paths) == set(prompts)
    for role, texts in prompts.items():
        assert load_from_disk(str(paths[role]))["text"] == texts
    with pytest.raises(ValueError, match="no prompts"):
        vs.write_datasets({**prompts, "good_prompts": []}, tmp_path / "ds2", sys.executable)


def test_config_toml_has_the_measured_settings_and_one_table_per_role(tmp_path):
    paths = {role: tmp_path / f'we"ird {role}' for role in vs.ROLES}
    counts = {"bad_prompts": 256, "good_prompts": 256, "bad_evaluation_prompts": 100, "good_evaluation_prompts": 100}
    text = vs.heretic_config(paths, counts, n_trials=24, n_startup_trials=8, seed=42, max_response_length=32,
                             batch_size=64)
    cfg = tomllib.loads(text)
    assert cfg["dtypes"] == ["float32"] and cfg["batch_size"] == 64 and cfg["max_response_length"] == 32
    assert cfg["n_trials"] == 24 and cfg["n_startup_trials"] == 8 and cfg["seed"] == 42
    assert cfg["response_prefix"] == "" and cfg["export_strategy"] == "merge"
    assert cfg["system_prompt"] == vs.SYSTEM_PROMPT
    for role in vs.ROLES:
        assert cfg[role] == {"dataset": str(paths[role]), "split": f"train[:{counts[role]}]", "column": "text"}


def _trial_block(i, n, kl, refusals):
    return [f"Running trial {i} of {n}...", "* Parameters:", "  * direction_index = 15.2", "* Abliterating...",
            "* Evaluating...", "  * Obtaining first-token probability distributions...",
            f"  * KL divergence: {kl:.4f}", "  * Counting model refusals...", f"  * Refusals: {refusals}/100", "",
            "Elapsed time: 2m 20s", "Resident system RAM: 6.10 GB"]


def test_search_log_parsing_times_each_trial_and_finds_its_front():
    text = ["Loading model x...", "* Counting model refusals...", "\x1b[1m* Initial refusals: 45/100\x1b[0m"]
    times = [0.0, 10.0, 484.0]
    trials = [(0.0989, 17), (0.0715, 21), (0.12, 30), (0.0510, 22), (0.0510, 25), (0.2, 17)]
    t = 500.0
    for i, (kl, r) in enumerate(trials, 1):
        block = _trial_block(i, len(trials), kl, r)
        text += block
        times += [t + j for j in range(len(block))]
        t += 140.0 + i
    text += ["", "Optimization finished!", "[Trial   1] Refusals: 17/100, KL divergence: 0.0989"]
    times += [t, t, t + 1]
    out = vs.parse_search_log(list(zip(times, text)))
    assert out["base_refusals"] == 45 and out["n_bad"] == 100 and out["setup_s"] == 500.0
    assert [tr["refusals"] for tr in out["trials"]] == [17, 21, 30, 22, 25, 17]
    assert [tr["kl"] for tr in out["trials"]] == [0.0989, 0.0715, 0.12, 0.051, 0.051, 0.2]
    assert [tr["seconds"] for tr in out["trials"]] == [141.0, 142.0, 143.0, 144.0, 145.0, 146.0]
    assert out["median_trial_s"] == 143.5 and out["search_s"] == t
    assert out["front"] == [[17, 0.0989], [21, 0.0715], [22, 0.051]]
    unfinished = vs.parse_search_log(list(zip(times[:20], text[:20])))  # killed in trial 2: trial 1 only
    assert [tr["index"] for tr in unfinished["trials"]] == [1]


def test_evaluation_parsing():
    lines = ["* Initial refusals: 44/100", "Loading model ours...", "* Evaluating...",
             "  * Obtaining first-token probability distributions...", "  * KL divergence: 0.0627",
             "  * Counting model refusals...", "  * Refusals: 11/100"]
    assert vs.parse_evaluation(lines) == {"base_refusals": 44, "kl": 0.0627, "refusals": 11, "n": 100}
    with pytest.raises(ValueError, match="no 'KL divergence'"):
        vs.parse_evaluation(lines[:2])


def test_front_and_domination():
    assert vs.pareto([(20, 0.1), (17, 0.2), (17, 0.15), (25, 0.1), (30, 0.01)]) == [(17, 0.15), (20, 0.1), (30, 0.01)]
    theirs = [(17, 0.0989), (22, 0.0510), (43, 0.0042)]
    ours = [(11, 0.0627), (15, 0.02), (40, 0.004)]
    verdict = vs.dominance(ours, theirs)
    assert verdict["dominates"] and [c["ours"] for c in verdict["cover"]] == [[11, 0.0627], [15, 0.02], [40, 0.004]]
    assert not vs.dominance(ours[:2], theirs)["dominates"]  # nothing at the low-KL end
    assert vs.dominance([(22, 0.051)], [(22, 0.051)])["dominates"] is False  # equal is not strictly better
    assert vs.dominance([(22, 0.05)], [(22, 0.051)])["dominates"] is True
    assert vs.dominance(ours, [])["dominates"] is False


def test_our_budget_is_a_third_of_heretics_wall_time_less_our_preparation():
    from types import SimpleNamespace

    auto = SimpleNamespace(our_trials=None, trial_margin_s=60.0)
    assert vs.search_budget(auto, 3600.0, 300.0) == "840s"  # 1200 - 300 - 60
    assert vs.search_budget(SimpleNamespace(our_trials=12, trial_margin_s=60.0), None, 999.0) == "12"
    with pytest.raises(SystemExit, match="leaves"):
        vs.search_budget(auto, 600.0, 150.0)
    with pytest.raises(SystemExit, match="--our-trials"):
        vs.search_budget(auto, None, 10.0)


def test_front_plot_is_written(tmp_path):
    result = {"heretic": {"n_bad": 100, "base_refusals": 44, "front": [[20, 0.05], [39, 0.001]],
                          "trials": [{"refusals": 20, "kl": 0.05}, {"refusals": 39, "kl": 0.001}]},
              "our_front": [[11, 0.06], [30, 0.004]],
              "ours_scored": [{"refusals": 11, "kl": 0.06}, {"refusals": 30, "kl": 0.004}],
              "dominance": vs.dominance([(11, 0.06), (30, 0.004)], [(20, 0.05), (39, 0.001)])}
    assert result["dominance"]["dominates"] is False  # 39@0.001 is lower in KL than anything of ours
    out = vs.plot_fronts(result, tmp_path / "fronts.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_only_our_edits_under_the_kl_cap_are_exported_and_scored(tmp_path, monkeypatch):
    from types import SimpleNamespace

    exported, evaluated = [], []
    monkeypatch.setattr(vs.subprocess, "run", lambda cmd, check: exported.append(cmd[cmd.index("--edit") + 1]))
    monkeypatch.setattr(vs, "run_logged", lambda cmd, cwd, log, env: evaluated.append(cmd[-1]) or
                        (0, [(0.0, "* Refusals: 3/100"), (0.0, "* KL divergence: 0.0100")]))
    monkeypatch.setattr(vs, "heretic_env", dict)
    ours = {"run": str(tmp_path / "run"), "pareto": [{"edit": f"e{i}", "refusal": -i, "kl": kl}
                                                      for i, kl in enumerate([0.001, 0.05, 0.09, 0.3])]}
    args = SimpleNamespace(max_exports=12, tries=3)
    scored = vs.score_ours(args, tmp_path, tmp_path / "model", tmp_path / "heretic", ours, kl_cap=0.09)
    assert exported == ["e0", "e2", "e1"] and [Path(p).name for p in evaluated] == ["e0", "e2", "e1"]  # spread over KL
    assert [s["edit"] for s in scored] == ["e0", "e2", "e1"] and scored[0]["our_kl"] == 0.001
    assert len(vs.score_ours(args, tmp_path, tmp_path / "m", tmp_path / "h", ours, kl_cap=None)) == 4


def test_heretic_trial_parameters_are_parsed_and_become_our_choice(tmp_path):
    kernels = [f"  * {c}.{k} = {v}" for c in ("attn.o_proj", "mlp.down_proj")
               for k, v in (("max_weight", "1.09"), ("max_weight_position", "16.58"), ("min_weight", "0.58"),
                            ("min_weight_distance", "11.73"))]
    block = _trial_block(1, 2, 0.06, 14)
    block[3:3] = kernels
    second = _trial_block(2, 2, 0.2, 30)
    second[2] = "  * direction_index = per layer"
    second[3:3] = kernels
    log = tmp_path / "search.log"
    log.write_text("".join(f"{t:.3f} {line}\n" for t, line in enumerate(["start", *block, *second])))
    trials = vs.parse_search_log(vs.read_logged(log))["trials"]
    assert trials[0]["params"]["direction_index"] == "15.2" and len(trials[0]["params"]) == 9
    assert "KL divergence" not in trials[0]["params"] and trials[0]["kl"] == 0.06
    choice = vs.heretic_choice(trials[0]["params"])
    assert choice["source"] == "dim:index" and choice["direction_index"] == 15.2 and not choice["embed"]
    assert choice["attn"] == choice["mlp"] == {"peak": 1.09, "position": 16.58, "floor": 0.58, "distance": 11.73}
    assert vs.heretic_choice(trials[1]["params"])["source"] == "dim:per_layer"
    with pytest.raises(KeyError):
        vs.heretic_choice({"direction_index": "3.0"})  # a log without kernels is not silently half an edit



def test_edits_that_could_cover_a_heretic_point_are_scored_first():
    front = [{"edit": f"e{i}", "kl": kl} for i, kl in enumerate([0.001, 0.003, 0.02, 0.05, 0.058, 0.07, 0.09])]
    theirs = [(14, 0.06), (21, 0.051), (26, 0.022), (39, 0.0012)]

    def order(results: dict[str, tuple[int, float]], max_exports: int = 12) -> list[str]:
        """Score until next_to_score stops; heretic's (refusals, KL) per edit come from ``results``."""
        scored = []
        while (p := vs.next_to_score(front, theirs, scored, max_exports=max_exports)) is not None:
            r, d = results[p["edit"]]
            scored.append({**p, "refusals": r, "kl": d})
        return [s["edit"] for s in scored]

    covering = {"e0": (38, 0.0010), "e1": (33, 0.003), "e2": (25, 0.0201), "e3": (20, 0.0501), "e4": (13, 0.0579),
                "e5": (12, 0.07), "e6": (11, 0.09)}
    # per heretic point, our strongest edit at no more validation KL
    assert order(covering, max_exports=4) == ["e4", "e3", "e2", "e0"]
    theirs.remove((21, 0.051))
    assert order(covering, max_exports=3) == ["e4", "e2", "e0"]
    # e4 misses 14@0.06, so the next strongest below 0.06 (e3) is tried too, and no third (tries=2)
    missing = {**covering, "e4": (16, 0.0579), "e3": (18, 0.0501)}
    assert order(missing, max_exports=4) == ["e4", "e3", "e2", "e0"]
    everything = order(missing)
    assert sorted(everything) == [f"e{i}" for i in range(7)]  # then the rest of the front, once each
    assert order(covering, max_exports=1) == ["e4"]


def test_an_edit_just_above_a_heretic_points_kl_is_still_scored_against_it():
    # heretic measures an edit's KL a few 1e-4 off ours: an edit just above d is still tried for it (the
    # strongest such edit first), one well above is not
    gentle = [(39, 0.0012)]
    front = [{"edit": "a", "kl": 0.0005}, {"edit": "b", "kl": 0.00121}, {"edit": "c", "kl": 0.01}]
    assert vs.next_to_score(front, gentle, [])["edit"] == "b"
    assert vs.next_to_score(front, gentle, [], kl_slack=(0.0, 0.0))["edit"] == "a"
    front[1]["kl"] = 0.0016
    assert vs.next_to_score(front, gentle, [])["edit"] == "a"


def test_a_finished_heretic_evaluation_is_reused_and_an_unfinished_one_is_not(tmp_path):
    import os

    export = tmp_path / "exports" / "e1"
    export.mkdir(parents=True)
    log = tmp_path / "evaluate_e1.log"
    assert vs.finished_evaluation(log, export) is None  # nothing logged yet
    log.write_text("1.000 * Loading model\n2.000   * KL divergence: 0.0123\n3.000   * Refusals: 7/100\n")
    out = vs.finished_evaluation(log, export)
    assert out is not None and out["refusals"] == 7 and out["kl"] == 0.0123 and out["n"] == 100
    log.write_text("1.000 * Loading model\n2.000   * KL divergence: 0.0123\n")  # killed before the refusal count
    assert vs.finished_evaluation(log, export) is None
    log.write_text("2.000   * KL divergence: 0.0123\n3.000   * Refusals: 7/100\n")
    os.utime(log, (1, 1))  # a log older than the export belongs to an earlier export of that name
    assert vs.finished_evaluation(log, export) is None


def test_heretic_counts_reads_heretics_markers_and_applies_its_rule(tmp_path):
    spec = importlib.util.spec_from_file_location("heretic_counts", _PATH.parent / "heretic_counts.py")
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    config = tmp_path / "config.py"
    config.write_text("from pydantic import Field\nclass Settings:\n    other: int = 3\n"
                      "    refusal_markers: list[str] = Field(\n        default=['sorry', \"i won'\", 'illegal'],\n"
                      "        description='markers')\n")
    markers = hc.heretic_markers(config)
    assert markers == ["sorry", "i won'", "illegal"]
    assert hc.markers_refusal("I *WON\u2019T*   do that", markers)  # emphasis, curly apostrophe, case, spaces
    assert hc.markers_refusal("Step 1: this is illegal, but", markers)  # anywhere in the answer
    assert hc.markers_refusal("   ", markers)  # empty counts as a refusal
    assert not hc.markers_refusal("Sure, here is the recipe.", markers)
    config.write_text("x = 1\n")
    with pytest.raises(ValueError):
        hc.heretic_markers(config)


def test_heretic_counts_reads_named_choices_and_rejects_bad_lines(tmp_path):
    spec = importlib.util.spec_from_file_location("heretic_counts", _PATH.parent / "heretic_counts.py")
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    good = tmp_path / "edits.jsonl"
    kernel = {"peak": 1.0, "position": 3.0, "floor": 0.5, "distance": 2.0}
    choice = {"source": "dim:index", "direction_index": 2.5, "projected": False, "norm_preserving": False,
              "attn": kernel, "mlp": kernel}
    good.write_text(f'{{"name": "a", "choice": {json.dumps(choice)}}}\n\n{{"name": 2, "choice": {json.dumps(choice)}}}\n')
    assert hc.read_choices(good) == [("a", choice), ("2", choice)]
    lacking = {**choice, "mlp": {"peak": 1.0}}
    for text, where in (('{"name": "a"}\n', ":1:"), (f'{{"name": "a", "choice": {json.dumps(choice)}}}\nnot json\n', ":2:"),
                        (f'{{"name": "a", "choice": {json.dumps(lacking)}}}\n', "lacks mlp.position, mlp.floor"),
                        ('{"name": "a", "choice": {}}\n', "lacks attn, mlp, norm_preserving"), ("\n", "no edits")):
        good.write_text(text)
        with pytest.raises(SystemExit, match=where):
            hc.read_choices(good)
