"""Model access: loading (HF id, local dir, GGUF, embedded default), architecture adapter, chat."""

from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.loading import EMBEDDED, LoadedModel, load_model

__all__ = ["EMBEDDED", "ChatFormatter", "LoadedModel", "ModelAdapter", "load_model"]
