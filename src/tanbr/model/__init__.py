"""The model world: find MoE blocks, merge them into dense experts, serve lean, record gates.

The public API, by step of the slot loop:

* discovery -- :func:`find_moe_blocks`, :func:`supports`, :class:`MoEBlock`;
* plan -- :func:`validate_coeffs`, :func:`validate_plan`, :func:`uniform_plan`,
  :func:`one_hot_plan`; grouped plans (m merged experts per block): :func:`group_coeffs`,
  :func:`grouped_plan`, :func:`identity_plan`, :func:`groups_of`; merged weights as a plan
  value: :class:`MergedWeights`, :func:`validate_weights`, :func:`validate_merge_plan`;
* static merges from calibration batches -- :func:`regmean_plan` (:func:`regmean_grams`,
  :func:`regmean_merge`), :func:`fisher_plan` (:func:`expert_fisher`, :func:`fisher_merge`,
  :func:`sampled_label_log_likelihood`, :func:`sampled_token_log_likelihood`),
  :class:`RoutingTap`;
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
    MergedWeights,
    group_coeffs,
    grouped_plan,
    groups_of,
    identity_plan,
    one_hot_plan,
    uniform_plan,
    validate_coeffs,
    validate_merge_plan,
    validate_plan,
    validate_weights,
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
from tanbr.model.fisher import (
    LossFn,
    expert_fisher,
    fisher_merge,
    fisher_plan,
    sampled_label_log_likelihood,
    sampled_token_log_likelihood,
)
from tanbr.model.gates import GateRecorder, gate_probs
from tanbr.model.lean import ExpertSource, ModuleExpertSource, SafetensorsExpertStore
from tanbr.model.merge import Merger, MergeStats, PreparedMerge
from tanbr.model.regmean import Grams, regmean_grams, regmean_merge, regmean_plan
from tanbr.model.static_merges import RoutingTap

ExpertStore = ExpertSource

__all__ = [
    "LAYOUTS",
    "ExpertSource",
    "ExpertStore",
    "FusedExpert",
    "GateRecorder",
    "Grams",
    "GroupedBlock",
    "LoadedModel",
    "LossFn",
    "MergeStats",
    "MergedBlock",
    "MergedWeights",
    "Merger",
    "MoEBlock",
    "ModuleExpertSource",
    "PreparedMerge",
    "RoutingTap",
    "SafetensorsExpertStore",
    "SoftMergedBlock",
    "Support",
    "Target",
    "UnsupportedModelError",
    "expert_fisher",
    "find_moe_blocks",
    "fisher_merge",
    "fisher_plan",
    "gate_probs",
    "group_coeffs",
    "grouped_plan",
    "groups_of",
    "identity_plan",
    "load_checkpoint",
    "one_hot_plan",
    "regmean_grams",
    "regmean_merge",
    "regmean_plan",
    "resolve_model_class",
    "sampled_label_log_likelihood",
    "sampled_token_log_likelihood",
    "supports",
    "uniform_plan",
    "validate_coeffs",
    "validate_merge_plan",
    "validate_plan",
    "validate_weights",
]
