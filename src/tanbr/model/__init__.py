"""The model world: find MoE blocks, merge them into dense experts, serve lean, record gates.

The public API, by step of the slot loop:

* discovery -- :func:`find_moe_blocks`, :func:`supports`, :class:`MoEBlock`;
* plan -> merge -- :func:`validate_coeffs`, :func:`validate_plan`, :func:`uniform_plan`,
  :func:`one_hot_plan`, :class:`Merger` (``apply``, ``prepare``/``commit``, ``apply_soft``,
  ``restore``), :class:`MergeStats`;
* memory-lean serving -- :func:`load_checkpoint` (``lean=True``),
  :class:`SafetensorsExpertStore`;
* profiles -- :class:`GateRecorder`.
"""

from __future__ import annotations

from tanbr.model.checkpoint import LoadedModel, load_checkpoint, resolve_model_class
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
from tanbr.model.merge import (
    FusedExpert,
    MergedBlock,
    Merger,
    MergeStats,
    PreparedMerge,
    SoftMergedBlock,
    one_hot_plan,
    uniform_plan,
    validate_coeffs,
    validate_plan,
)

ExpertStore = ExpertSource

__all__ = [
    "LAYOUTS",
    "ExpertSource",
    "ExpertStore",
    "FusedExpert",
    "GateRecorder",
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
    "load_checkpoint",
    "one_hot_plan",
    "resolve_model_class",
    "supports",
    "uniform_plan",
    "validate_coeffs",
    "validate_plan",
]
