"""Session fixtures on the embedded real model (Qwen2.5-Coder-0.5B-Instruct, CPU).

Loaded once per test session; the DIM direction is built from a small train sample so every
integration test shares one extraction. Layer 14 is where DIM ablation works on this model
(see DESIGN.md §3); the selection test checks that selection lands in that region itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from refusal_atlas.model.activations import extract
from refusal_atlas.data import load_prompts
from refusal_atlas.directions.dim import difference_in_means
from refusal_atlas.evaluation.refusal import refusal_token_ids
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model

DIM_LAYER = 14


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def embedded():
    loaded = load_model("embedded", device="cpu")
    adapter = ModelAdapter(loaded.model)
    chat = ChatFormatter(loaded.tokenizer)
    return SimpleNamespace(loaded=loaded, adapter=adapter, chat=chat, refusal_ids=refusal_token_ids(loaded.tokenizer))


@pytest.fixture(scope="session")
def embedded_acts(embedded):
    """Harmful/harmless train representations (48 + 48 prompts, layers 0..17, all positions)."""
    harmful = [p.instruction for p in load_prompts("harmful_train", n=48, seed=0)]
    harmless = [p.instruction for p in load_prompts("harmless_train", n=48, seed=0)]
    kw = dict(layers=range(18), positions=None, batch_size=16)
    return {"harmful": extract(embedded.adapter, embedded.chat, harmful, **kw),
            "harmless": extract(embedded.adapter, embedded.chat, harmless, **kw)}


@pytest.fixture(scope="session")
def embedded_dim(embedded_acts):
    """The DIM direction at layer 14, last post-instruction token."""
    return difference_in_means(embedded_acts["harmful"], embedded_acts["harmless"]).at(layer=DIM_LAYER, position=-1)
