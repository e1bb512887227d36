"""Judge agreement statistics on an example computed by hand."""

from __future__ import annotations

import pytest

from refusal_atlas.evaluation.agreement import (agreement, in_view, judge_agreement, markdown_tables, paired_comparison,
                                             paired_table)

GOLD = ["refusal", "refusal", "deflection", "compliance", "compliance", "broken"]
PRED = ["refusal", "compliance", "deflection", "compliance", "deflection", "unclear"]
ROLES = ["harmful"] * 5 + ["harmless"]


def test_four_labels_by_hand():
    rec = agreement(GOLD, PRED, ("refusal", "deflection", "compliance", "broken"))
    assert rec["n"] == 6 and rec["unclear"] == 1
    acc = rec["accuracy"]
    assert (acc["count"], acc["n"]) == (3, 6)  # rows 1, 3, 4 agree
    assert acc["ci95"] == pytest.approx([0.1876, 0.8124], abs=1e-4)  # Wilson 3/6: 0.5 ± 0.3124
    got = {c: (r["count"], r["n"]) for c, r in rec["recall"].items()}
    assert got == {"refusal": (1, 2), "deflection": (1, 1), "compliance": (1, 2), "broken": (0, 1)}
    assert rec["recall"]["deflection"]["ci95"] == pytest.approx([0.2065, 1.0], abs=1e-4)  # Wilson 1/1
    assert rec["confusion"]["compliance"] == {"refusal": 0, "deflection": 1, "compliance": 1, "broken": 0,
                                              "unclear": 0}
    assert rec["confusion"]["broken"]["unclear"] == 1  # an unclear verdict is a wrong one, never dropped
    assert (rec["rates"]["refusal"]["gold"]["count"], rec["rates"]["refusal"]["judge"]["count"]) == (2, 1)
    assert (rec["rates"]["deflection"]["gold"]["count"], rec["rates"]["deflection"]["judge"]["count"]) == (1, 2)


def test_views_by_hand():
    views = judge_agreement(GOLD, ROLES, PRED, four=True)
    assert set(views) == {"four", "refusal", "complied"}
    # refusal vs rest: R/R ok, R/O wrong, O/O ok ×3 (deflection and compliance are both "other"), O/unclear wrong
    assert (views["refusal"]["accuracy"]["count"], views["refusal"]["n"]) == (4, 6)
    assert {c: (r["count"], r["n"]) for c, r in views["refusal"]["recall"].items()} == {"refusal": (1, 2),
                                                                                        "other": (3, 4)}
    # did what was asked, harmful rows only (the broken harmless row is left out):
    # gold N N N C C vs judge N C N C N → 3 of 5
    c = views["complied"]
    assert c["n"] == 5 and c["accuracy"]["count"] == 3
    assert {k: (r["count"], r["n"]) for k, r in c["recall"].items()} == {"not_complied": (2, 3), "compliance": (1, 2)}
    # a refusal/compliance judge is scored on the two binary questions only
    binary = judge_agreement(GOLD, ROLES, ["refusal", "compliance", "compliance", "compliance", "refusal", "refusal"],
                             four=False)
    assert set(binary) == {"refusal", "complied"}
    assert binary["complied"]["accuracy"]["count"] == 2  # N/N, N/C, N/C, C/C, C/N
    table = markdown_tables({"x": views, "y": binary})
    assert "| x | 6 | 0.50 [0.19, 0.81] (3/6) |" in table and "| y | 6 |" in table
    assert "#### x, four labels: confusion" in table


def test_view_mapping_and_bad_input():
    assert [in_view("complied", x) for x in ("refusal", "deflection", "broken", "compliance", "unclear")] == [
        "not_complied", "not_complied", "not_complied", "compliance", "unclear"]
    assert in_view("refusal", "deflection") == "other" and in_view("four", "broken") == "broken"
    with pytest.raises(ValueError, match="gold labels"):
        agreement(["refusal"], [], ("refusal", "other"))
    with pytest.raises(ValueError, match="not among"):
        agreement(["refusal"], ["maybe"], ("refusal", "other"))
    with pytest.raises(ValueError, match="no rows"):
        agreement([], [], ("refusal", "other"))


def test_paired_comparison_counts_only_discordant_rows_and_uses_the_exact_binomial_tail():
    # judge A is right on all 12 rows, judge B misses the six refusals
    gold = ["refusal"] * 6 + ["compliance"] * 6
    first = list(gold)
    second = ["compliance"] * 6 + ["compliance"] * 6  # wrong on the six refusals only
    rec = paired_comparison(gold, first, second)
    assert (rec["first_only"], rec["second_only"]) == (6, 0)
    assert abs(rec["p_value"] - 2 / 2 ** 6) < 1e-12  # both tails of 6 coin flips all landing one way
    assert rec["first_better"]
    # deflection and compliance are both "other" in the refusal view, so they are not discordant
    assert paired_comparison(["deflection"], ["compliance"], ["deflection"])["first_only"] == 0
    # 3 against 1 is not evidence: p = 2 * (1 + 4) / 16
    few = paired_comparison(["refusal"] * 4, ["refusal"] * 3 + ["compliance"], ["compliance"] * 3 + ["refusal"])
    assert (few["first_only"], few["second_only"]) == (3, 1) and abs(few["p_value"] - 10 / 16) < 1e-12
    assert not few["first_better"]
    reverse = paired_comparison(gold, second, first)
    assert not reverse["first_better"] and reverse["p_value"] == rec["p_value"]
    table = paired_table({"meaning": rec}, "substring")
    assert "| meaning | 6 | 0 | 0.031 | yes |" in table
