import pytest
import torch

from refusal_atlas.model.activations import extract, load_activation_sets, save_activation_sets
from refusal_atlas.core.errors import ArtifactError, ModelError
from refusal_atlas.model import ChatFormatter
from tiny import tiny_tokenizer


def test_post_instruction_tokens_end_every_left_padded_row(tiny_parts, prompts):
    _, _, chat = tiny_parts
    batch = chat.encode(prompts)
    assert chat.tokenizer.padding_side == "left"
    assert (batch["input_ids"][:, -chat.n_eoi:] == torch.tensor(chat.eoi_ids)).all()
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the test really has padding
    assert (batch["attention_mask"][:, -1] == 1).all()


def test_padded_rows_match_unpadded_logits(tiny_parts, prompts):
    tiny, _, chat = tiny_parts
    batch = chat.encode(prompts)
    padded = tiny.model(**batch).logits[:, -1]
    for i, p in enumerate(prompts):
        alone = tiny.model(**chat.encode([p])).logits[0, -1]
        assert torch.allclose(padded[i], alone, atol=1e-4), f"row {i} changed by padding"


def test_extracted_means_match_per_prompt_means(tiny_parts, prompts):
    _, adapter, chat = tiny_parts
    batched = extract(adapter, chat, prompts, layers=[1, 3], positions=None, batch_size=4)
    singles = [extract(adapter, chat, [p], layers=[1, 3], positions=None, batch_size=1) for p in prompts]
    mean = torch.stack([s.mean for s in singles]).mean(0)
    assert batched.mean.shape == (chat.n_eoi, 2, adapter.d_model)
    assert torch.allclose(batched.mean, mean, atol=1e-5)
    # per-prompt last-token reps keep the original prompt order despite length sorting
    for i, s in enumerate(singles):
        assert torch.allclose(batched.last[i], s.last[0], atol=1e-5)


def test_shared_prefix_extraction_equals_plain_passes(tiny_parts, prompts, monkeypatch):
    import refusal_atlas.model.activations as activations

    _, adapter, chat = tiny_parts
    plan = activations._prefix_plan(adapter, chat, prompts, 4)
    assert plan is not None and len(plan.prefix) > 0  # this test really takes the shared-prefix path
    assert activations._prefix_plan(adapter, chat, prompts[:1], 4) is None  # one prompt: nothing of its own left
    fast = extract(adapter, chat, prompts, layers=[0, 2, 3], positions=None, batch_size=3)
    monkeypatch.setattr(activations, "supports_prefix_reuse", lambda adapter: False)
    plain = extract(adapter, chat, prompts, layers=[0, 2, 3], positions=None, batch_size=3)
    assert torch.allclose(fast.mean, plain.mean, atol=1e-5) and torch.allclose(fast.last, plain.last, atol=1e-5)
    assert not torch.equal(fast.mean[:, 0], fast.mean[:, 1])  # layers differ: the hooks read the right blocks


def test_extract_roundtrip_and_errors(tmp_path, tiny_parts, prompts):
    _, adapter, chat = tiny_parts
    a = extract(adapter, chat, prompts, layers=[0, 2], positions=[-1])
    save_activation_sets(tmp_path / "acts.safetensors", {"harmful": a})
    b = load_activation_sets(tmp_path / "acts.safetensors")["harmful"]
    assert torch.equal(a.mean, b.mean) and b.layers == [0, 2] and b.n == len(prompts)
    with pytest.raises(ModelError, match="out of range"):
        extract(adapter, chat, prompts, layers=[adapter.n_layers])
    with pytest.raises(ModelError, match="post-instruction position"):
        extract(adapter, chat, prompts, positions=[-chat.n_eoi - 1])
    with pytest.raises(ArtifactError):
        extract(adapter, chat, [], layers=[0])
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_activation_sets(tmp_path / "bad.safetensors")


def test_model_without_chat_template_is_refused():
    with pytest.raises(ModelError, match="no chat template"):
        ChatFormatter(tiny_tokenizer(chat_template=None))


def test_system_prompt_policy(tiny_parts):
    _, _, chat = tiny_parts
    with_system = ChatFormatter(chat.tokenizer, system="you are helpful")
    assert "<|im_start|>system you are helpful" in with_system.render("tell joke")
    assert "system" not in chat.render("tell joke")
    assert with_system.eoi_ids == chat.eoi_ids
