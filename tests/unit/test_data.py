"""Prompt-data layer: shipped registry counts, sampling, user-file formats and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusal_atlas.data import DatasetInfo, Prompt, dataset_info, list_datasets, load_prompts
from refusal_atlas.core.errors import DataError

EXPECTED_COUNTS = {
    "harmful_train": 260, "harmful_val": 39, "harmful_test": 572,
    "harmless_train": 18793, "harmless_val": 6264, "harmless_test": 6266,
    "salad_harmful_train": 1184, "salad_harmful_val": 128, "salad_harmful_test": 572,
    "salad_harmless_train": 25058, "salad_harmless_val": 3132, "salad_harmless_test": 3133,
    "jailbreakbench": 100, "harmbench_val": 41, "harmbench_test": 159, "advbench": 520,
    "strongreject": 313, "malicious_instruct": 100, "tdc2023": 100, "xstest": 250,
    "orbench_hard": 1319,
}  # fmt: skip


# ---------------------------------------------------------------- registry


def test_registry_names_are_exactly_the_documented_ones() -> None:
    assert [d.name for d in list_datasets()] == list(EXPECTED_COUNTS)


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_every_registered_set_loads_with_its_count(name: str) -> None:
    info = dataset_info(name)
    prompts = load_prompts(name)
    assert len(prompts) == info.n == EXPECTED_COUNTS[name]
    assert all(isinstance(p, Prompt) and p.instruction.strip() for p in prompts)


def test_registry_metadata_is_consistent() -> None:
    for info in list_datasets():
        assert isinstance(info, DatasetInfo)
        assert info.role in {"harmful", "harmless", "over_refusal"}
        assert info.source and info.license
        if info.path.startswith("splits/"):
            assert info.split is not None and info.path.endswith(f"{info.role}_{info.split}.json")
        else:
            assert info.split is None and info.path == f"benchmarks/{info.name}.json"
    assert {d.name for d in list_datasets() if d.role == "over_refusal"} == {"xstest", "orbench_hard"}
    assert "NC" in dataset_info("harmless_train").license


def test_docs_table_lists_every_set() -> None:
    from importlib.resources import files

    doc = files("refusal_atlas.data").joinpath("DATASETS.md").read_text(encoding="utf-8")
    assert "Content warning" in doc
    for info in list_datasets():
        assert f"| `{info.name}` | `{info.path}` | {info.n} |" in doc


def test_categories_and_targets_are_kept() -> None:
    salad_test = load_prompts("salad_harmful_test")
    assert sum(p.target is not None for p in salad_test) == 100
    assert salad_test[0].target is not None and salad_test[0].target.startswith("Sure, here is")
    assert len({p.category for p in load_prompts("jailbreakbench")}) == 10
    assert all(p.category is None for p in load_prompts("advbench"))


def _instructions(name: str) -> set[str]:
    return {p.instruction for p in load_prompts(name)}


@pytest.mark.parametrize("prefix", ["", "salad_"])
def test_harmful_train_and_val_do_not_leak_into_test(prefix: str) -> None:
    test = _instructions(f"{prefix}harmful_test")
    assert not _instructions(f"{prefix}harmful_train") & test
    assert not _instructions(f"{prefix}harmful_val") & test


def test_harmful_test_is_jbb_harmbench_strongreject_concatenated() -> None:
    parts = [load_prompts(n) for n in ("jailbreakbench", "harmbench_test", "strongreject")]
    assert load_prompts("harmful_test") == [p for part in parts for p in part]


# ---------------------------------------------------------------- sampling


def test_sampling_is_deterministic_and_seed_dependent() -> None:
    a = load_prompts("harmless_train", n=50, seed=1)
    assert len(a) == 50 and len(set(a)) == 50
    assert a == load_prompts("harmless_train", n=50, seed=1)
    assert a != load_prompts("harmless_train", n=50, seed=2)
    assert set(a) <= set(load_prompts("harmless_train"))


def test_sample_at_least_the_set_size_returns_everything_in_order() -> None:
    full = load_prompts("jailbreakbench")
    assert load_prompts("jailbreakbench", n=100, seed=5) == full
    assert load_prompts("jailbreakbench", n=10_000, seed=5) == full


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_sample_size_is_rejected(bad: int) -> None:
    with pytest.raises(DataError, match="positive"):
        load_prompts("jailbreakbench", n=bad)


def test_returned_list_is_a_copy() -> None:
    first = load_prompts("harmful_val")
    first.clear()
    assert len(load_prompts("harmful_val")) == 39


# ---------------------------------------------------------------- user file formats


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_json_list_of_objects(tmp_path: Path) -> None:
    recs = [{"instruction": "a", "category": "c1"}, {"instruction": "b", "target": "Sure"}]
    got = load_prompts(_write(tmp_path / "p.json", json.dumps(recs)))
    assert got == [Prompt("a", "c1"), Prompt("b", None, "Sure")]


def test_json_list_of_strings_and_custom_field(tmp_path: Path) -> None:
    assert load_prompts(_write(tmp_path / "s.json", '["x", "y"]')) == [Prompt("x"), Prompt("y")]
    path = _write(tmp_path / "f.json", json.dumps([{"prompt": "hi", "category": 3}]))
    assert load_prompts(path, field="prompt") == [Prompt("hi", "3")]


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"instruction": "a"}\n\n  \n{"instruction": "b", "category": "k"}\n')
    assert load_prompts(path) == [Prompt("a"), Prompt("b", "k")]


def test_csv_with_optional_columns(tmp_path: Path) -> None:
    text = 'goal,category,target,extra\n"Hello, world",cat,"Sure, here",x\nsecond,,,y\n'
    path = _write(tmp_path / "p.csv", text)
    assert load_prompts(path, field="goal") == [Prompt("Hello, world", "cat", "Sure, here"), Prompt("second")]


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffinstruction\nq1\n".encode())
    assert load_prompts(str(path)) == [Prompt("q1")]


def test_txt_one_prompt_per_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", "first\n\n  second  \r\n\n")
    assert load_prompts(path) == [Prompt("first"), Prompt("second")]


def test_user_file_sampling_and_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"q{i}" for i in range(20)), encoding="utf-8")
    assert load_prompts(path, n=5, seed=3) == load_prompts(str(path), n=5, seed=3)
    assert len(load_prompts(path, n=5, seed=3)) == 5


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_registry(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_prompts("harmfull_train")
    msg = str(exc.value)
    assert "harmfull_train" in msg and "harmful_train" in msg and "refusal-atlas datasets" in msg
    with pytest.raises(DataError, match="missing file"):
        load_prompts(str(tmp_path / "nope.json"))


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a regular file"):
        load_prompts(str(tmp_path))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.yaml", "- a\n")
    with pytest.raises(DataError) as exc:
        load_prompts(path)
    assert "p.yaml" in str(exc.value) and ".yaml" in str(exc.value) and ".jsonl" in str(exc.value)


# malformed files: each error names the file and where in it the problem is
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.json", '[{"instruction": "a"},\n', r"bad\.json.*not valid JSON.*line 2"),
        ("obj.json", '{"instruction": "a"}', r"obj\.json.*JSON list.*dict"),
        ("bad.jsonl", '{"instruction": "a"}\n\n{"instruction": \n', r"bad\.jsonl.*line 3"),
        ("n.json", '["ok", 5]', r"n\.json.*record 1 is int, expected"),
        ("c.csv", "prompt,category\nhello,x\n", r"c\.csv.*no 'instruction' column.*prompt, category"),
        ("r.csv", "instruction,category\nfine,a\n,b\n", r"r\.csv.*row 1 field 'instruction' is empty"),
    ],
    ids=["malformed_json", "json_not_a_list", "malformed_jsonl_names_line", "non_object_record",
         "csv_without_column", "csv_empty_cell_names_row"],
)
def test_malformed_file_names_the_problem(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_prompts(_write(tmp_path / name, text))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt.*UTF-8"):
        load_prompts(str(path))


def test_missing_field_names_record(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.json", json.dumps([{"instruction": "a"}, {"prompt": "b"}]))
    with pytest.raises(DataError, match=r"m\.json.*record 1 has no 'instruction' key.*prompt"):
        load_prompts(path)
    jsonl = _write(tmp_path / "m.jsonl", '{"instruction": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl.*record 1 \(line 2\) has no 'instruction'"):
        load_prompts(jsonl)


@pytest.mark.parametrize(
    ("value", "problem"),
    [("", "is empty"), ("   ", "is empty"), (None, "is null"), (7, "is int, not a string")],
)
def test_empty_or_non_string_value_names_record(tmp_path: Path, value: object, problem: str) -> None:
    path = _write(tmp_path / "v.json", json.dumps([{"instruction": "ok"}, {"instruction": value}]))
    with pytest.raises(DataError, match=rf"v\.json.*record 1 field 'instruction' {problem}"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("name", "text"), [("e.json", "[]"), ("e.jsonl", "\n\n"), ("e.txt", " \n\n"), ("e.csv", ""),
                       ("h.csv", "instruction\n")],
)
def test_empty_dataset(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}.*contains no prompts"):
        load_prompts(path)


def test_registered_set_with_absent_field_names_record() -> None:
    with pytest.raises(DataError, match=r"salad_harmful_test.*record 100 has no 'target' key"):
        load_prompts("salad_harmful_test", field="target")
