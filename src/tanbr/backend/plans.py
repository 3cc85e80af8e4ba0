"""What every backend does with a plan: check it, tell two plans apart, key its predictions.

A block's plan value is coefficients ((E,), or (m, E) for m merged experts) or merged weights
(:class:`~tanbr.model.MergedWeights`, from RegMean or Fisher-weighted averaging). Backends keep
the plan they serve to skip a merge that would change nothing, and key their memo of
predictions by it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tanbr.model import MergedWeights, MoEBlock, validate_merge_plan

PlanValue = np.ndarray | MergedWeights
CheckedPlan = dict[str, PlanValue]


def checked_plan(plan: Mapping[str, Any], blocks: Sequence[MoEBlock]) -> CheckedPlan:
    """The plan validated against the model's blocks; coefficients as float64 arrays."""
    out: CheckedPlan = {}
    for name, value in validate_merge_plan(plan, blocks).items():
        out[name] = value if isinstance(value, MergedWeights) else np.asarray(value, np.float64)
    return out


def same_plan(a: Mapping[str, PlanValue], b: Mapping[str, Any]) -> bool:
    """Whether two plans merge the same (merged weights: the same object)."""
    if a.keys() != b.keys():
        return False
    for name, value in a.items():
        other = b[name]
        if isinstance(value, MergedWeights) or isinstance(other, MergedWeights):
            if value is not other:
                return False
        elif not np.array_equal(value, np.asarray(other)):
            return False
    return True


def plan_key(plan: Mapping[str, PlanValue]) -> bytes:
    """Bytes that identify what a plan computes (a memo key)."""
    parts = []
    for name in sorted(plan):
        value = plan[name]
        parts.append(weights_digest(value) if isinstance(value, MergedWeights) else value.tobytes())
    return b"merged" + b"".join(parts)


def weights_digest(value: MergedWeights) -> bytes:
    """sha256 of merged weights' method and tensors (cached on the value: it is frozen)."""
    cached = getattr(value, "_digest", None)
    if isinstance(cached, bytes):
        return cached
    h = hashlib.sha256(value.method.encode())
    for target in sorted(value.tensors):
        tensor = torch.as_tensor(value.tensors[target]).detach().float().contiguous()
        h.update(target.encode())
        h.update(tensor.numpy().tobytes())
    digest = h.digest()
    object.__setattr__(value, "_digest", digest)
    return digest


def merged_experts(value: PlanValue) -> int:
    """How many merged experts a block's plan value keeps resident."""
    return 1 if isinstance(value, MergedWeights) else int(np.atleast_2d(value).shape[0])
