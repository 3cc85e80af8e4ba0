"""The model world: find MoE blocks, merge them into dense experts, serve lean, record gates.

The public API, by step of the slot loop:

* discovery -- :func:`find_moe_blocks`, :func:`supports`, :class:`MoEBlock`;
* plan -- :func:`validate_coeffs`, :func:`validate_plan`, :func:`uniform_plan`,
  :func:`one_hot_plan`; grouped plans (m merged experts per block): :func:`group_coeffs`,
  :func:`grouped_plan`, :func:`identity_plan`, :func:`groups_of`;
* merge -- :class:`Merger` (``apply``, ``prepare``/``commit``, ``apply_soft``, ``restore``,
  ``group_top_k``), :class:`MergeStats`, the stand-in blocks :class:`MergedBlock`,
  :class:`GroupedBlock`, :class:`SoftMergedBlock`;
* memory-lean serving -- :func:`load_checkpoint` (``lean=True``),
  :class:`SafetensorsExpertStore`;
* profiles -- :class:`GateRecorder`.
"""

from __future__ import annotations

from tanbr.model.blocks import FusedExpert, GroupedBlock, MergedBlock, SoftMergedBlock
from tanbr.model.checkpoint import LoadedModel, load_checkpoint, resolve_model_class
from tanbr.model.coeffs import (
    group_coeffs,
    grouped_plan,
    groups_of,
    identity_plan,
    one_hot_plan,
    uniform_plan,
    validate_coeffs,
    validate_plan,
)
from tanbr.model.discovery import (
    LAYOUTS,
    MoEBlock,
    Support,
    Target,
    UnsupportedModelError,
    find_moe_blocks,
    supports,
)
from tanbr.model.gates import GateRecorder, gate_probs
from tanbr.model.lean import ExpertSource, ModuleExpertSource, SafetensorsExpertStore
from tanbr.model.merge import Merger, MergeStats, PreparedMerge

ExpertStore = ExpertSource

__all__ = [
    "LAYOUTS",
    "ExpertSource",
    "ExpertStore",
    "FusedExpert",
    "GateRecorder",
    "GroupedBlock",
    "LoadedModel",
    "MergeStats",
    "MergedBlock",
    "Merger",
    "MoEBlock",
    "ModuleExpertSource",
    "PreparedMerge",
    "SafetensorsExpertStore",
    "SoftMergedBlock",
    "Support",
    "Target",
    "UnsupportedModelError",
    "find_moe_blocks",
    "gate_probs",
    "group_coeffs",
    "grouped_plan",
    "groups_of",
    "identity_plan",
    "load_checkpoint",
    "one_hot_plan",
    "resolve_model_class",
    "supports",
    "uniform_plan",
    "validate_coeffs",
    "validate_plan",
]
