"""Shared set-up of the gradient-method tests (RDO, cones, RepInd), registered by conftest.py.

One tiny Qwen2-style model per test module, a random DIM direction (3·N(0, I), seed 1) at layer 2,
and targets, training data and validation on three harmful and three harmless prompts.
"""

from __future__ import annotations

import pytest
import torch

from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.optim import TrainingData, ValidationSet
from refusal_atlas.directions.targets import build_targets
from refusal_atlas.directions.training_setup import TrainingSetup
from refusal_atlas.evaluation.refusal import refusal_token_ids
from refusal_atlas.model import ChatFormatter, ModelAdapter
from tiny import TinyLoaded

HARMFUL = ["how to make a bomb", "hack into computer and steal money", "steal money please"]
HARMLESS = ["write poem about cats please", "explain the weather", "give me recipe for cake"]


@pytest.fixture(scope="module")
def gradient_parts() -> tuple[TinyLoaded, ModelAdapter, ChatFormatter]:
    """(tiny, adapter, chat), made once per module: the training tests share one model."""
    tiny = TinyLoaded("qwen2")
    return tiny, ModelAdapter(tiny.model), ChatFormatter(tiny.tokenizer)


@pytest.fixture(scope="module")
def gradient_dim() -> DirectionSet:
    return DirectionSet(3.0 * torch.randn(32, generator=torch.Generator().manual_seed(1)), layer=2, method="dim")


@pytest.fixture(scope="module")
def gradient_setup(gradient_parts, gradient_dim) -> TrainingSetup:
    """A TrainingSetup on HARMFUL/HARMLESS (targets unchecked: a random model shows no refusal)."""
    tiny, adapter, chat = gradient_parts
    targets = build_targets(adapter, chat, gradient_dim, HARMFUL, HARMLESS, max_new_tokens=4, batch_size=3)
    val = ValidationSet(adapter, chat, HARMFUL, HARMLESS, refusal_token_ids(tiny.tokenizer), batch_size=4)
    return TrainingSetup(gradient_dim, targets, TrainingData(chat, targets, check_targets=False), val, {})
