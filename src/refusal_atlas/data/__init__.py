"""Prompt data: the shipped registry of prompt sets and loaders for user prompt files.

See ``DATASETS.md`` next to this file for sources, licences and a content warning.
"""

from refusal_atlas.data.loaders import SUPPORTED_SUFFIXES, Prompt, load_prompts
from refusal_atlas.data.registry import REGISTRY, DatasetInfo, dataset_info, list_datasets

__all__ = [
    "REGISTRY",
    "SUPPORTED_SUFFIXES",
    "DatasetInfo",
    "Prompt",
    "dataset_info",
    "list_datasets",
    "load_prompts",
]
