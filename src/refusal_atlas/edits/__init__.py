"""Edits: model changes usable as hooks, as reversible weight edits, and exported exactly as evaluated."""

from refusal_atlas.edits.ablation import DirectionalAblation
from refusal_atlas.edits.actadd import ActAdd
from refusal_atlas.edits.base import EDIT_TYPES, Edit, NoEdit, load_edit, load_run_edit
from refusal_atlas.edits.kernel import StrengthKernel
from refusal_atlas.edits.layerwise import LayerwiseAblation
from refusal_atlas.edits.lowrank import LowRankEdit

__all__ = ["ActAdd", "DirectionalAblation", "EDIT_TYPES", "Edit", "LayerwiseAblation", "LowRankEdit", "NoEdit",
           "StrengthKernel", "load_edit", "load_run_edit"]
