import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_atlas.core.errors import ModelError
from refusal_atlas.edits.interventions import ablate
from refusal_atlas.model import ChatFormatter, ModelAdapter
from refusal_atlas.model.saving import save_model_dir
from refusal_atlas.export.orthogonalize import orthogonalize_weights
from tiny import TinyLoaded


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("llama", True), ("mistral", False)])
def test_orthogonalized_weights_match_hook_ablation(arch, tie, prompts, tmp_path):
    tiny = TinyLoaded(arch, tie=tie)
    adapter, chat = ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)
    assert adapter.embeddings_tied == tie
    dirs = torch.randn(2, adapter.d_model)
    batch = chat.encode(prompts)
    clean = tiny.model(**batch).logits
    with ablate(adapter, dirs):
        hooked = tiny.model(**batch).logits
    report = orthogonalize_weights(tiny.model, dirs)
    edited = tiny.model(**batch).logits
    assert report["untied_embeddings"] == tie
    assert torch.allclose(edited, hooked, atol=1e-4), (edited - hooked).abs().max()
    assert not torch.allclose(edited, clean, atol=1e-3)
    # the exported directory reloads to the same logits, with the unembedding untouched
    save_model_dir(tiny.model, tiny.tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.allclose(reloaded(**batch).logits, hooked, atol=1e-4)
    assert not reloaded.config.tie_word_embeddings


def test_weight_export_refused_for_post_norm_architectures():
    tiny = TinyLoaded("gemma2")
    with pytest.raises(ModelError, match="post-norms"):
        orthogonalize_weights(tiny.model, torch.randn(tiny.model.config.hidden_size))
