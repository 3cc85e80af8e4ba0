"""From a policy's action to a plan (every MoE block's merge coefficients).

``task-simplex`` (the default): the action a lives on the simplex over the K task types and
block l's coeffs are ``c_l = normalize(sum_k a_k U_{l,k})``, where ``U_{l,k}`` is task type k's
expert-usage profile in block l (the mean gate probabilities of the requests the estimator
assigns to k; label-free). The action says "how much each task's experts count"; K is small
(4..8) while a block may have many experts, and the same action means the same thing in
every block.

``task-relative``: the same profiles, but the action re-weights the estimated mix p instead of
replacing it: ``b = normalize((p + floor) * a)`` elementwise, then ``c_l = normalize(sum_k b_k
U_{l,k})``. The centre of the simplex is the plug-in merge (b = p), the vertices are the task
types' own merges, and every point of the task simplex stays reachable; the policy learns a
context-dependent correction of the plug-in merge rather than the merge itself.

``direct``: the action lives on the simplex over the E experts and is shared by all blocks,
for models without task structure.

Every parameterization has ``plan(action, context=None)``; only ``task-relative`` reads the
context (the estimated mix).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tanbr.backend.protocol import Plan


def _as_action(action: np.ndarray, dim: int) -> np.ndarray:
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (dim,):
        raise ValueError(f"action must have shape ({dim},), got {a.shape}")
    if not np.isfinite(a).all() or (a < -1e-9).any() or abs(a.sum() - 1.0) > 1e-6:
        raise ValueError(f"action must lie on the simplex, got {np.round(a, 4).tolist()}")
    a = np.clip(a, 0.0, None)
    return np.asarray(a / a.sum())


def cluster_profiles(
    assign: np.ndarray, gate_probs: Mapping[str, np.ndarray], n_types: int
) -> dict[str, np.ndarray]:
    """U per block (n_types, E): the mean gate probabilities of each task type's requests.

    ``gate_probs[block]`` is (n, E), one row per request (its tokens' mean gate
    probabilities). A type with no member gets the overall mean (it carries no information).
    """
    assign = np.asarray(assign, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name, probs in gate_probs.items():
        probs = np.asarray(probs, dtype=np.float64)  # (n, E)
        if probs.ndim != 2 or probs.shape[0] != assign.shape[0]:
            raise ValueError(
                f"gate probabilities of block {name!r} must be (n={assign.shape[0]}, E), "
                f"got {probs.shape}"
            )
        profile = np.tile(probs.mean(0), (n_types, 1))  # (K, E)
        for k in range(n_types):
            members = probs[assign == k]
            if len(members):
                profile[k] = members.mean(0)
        out[name] = profile
    return out


class TaskSimplex:
    """Action on Simplex(K); ``c_l = normalize(a @ U_l)`` for every block l."""

    name = "task-simplex"

    def __init__(self, profiles: Mapping[str, np.ndarray]) -> None:
        if not profiles:
            raise ValueError("task-simplex needs the profile of at least one block")
        dims = {np.asarray(u).shape[0] for u in profiles.values()}
        if len(dims) != 1:
            raise ValueError(f"every block's profile must have the same K, got {sorted(dims)}")
        self.profiles: dict[str, np.ndarray] = {}
        for name, u in profiles.items():
            u = np.asarray(u, dtype=np.float64)  # (K, E)
            if u.ndim != 2 or not np.isfinite(u).all() or (u < 0).any():
                raise ValueError(f"profile of block {name!r} must be a finite (K, E) array >= 0")
            if (u.sum(1) <= 0).any():
                raise ValueError(f"profile of block {name!r} has an all-zero row")
            self.profiles[name] = u / u.sum(1, keepdims=True)
        self.dim = dims.pop()

    def plan(self, action: np.ndarray, context: np.ndarray | None = None) -> Plan:
        a = _as_action(action, self.dim)
        plan = {}
        for name, u in self.profiles.items():
            c = a @ u  # (E,)
            plan[name] = c / c.sum()
        return plan


class Direct:
    """Action on Simplex(E), the same coeffs in every block (all blocks need the same E)."""

    name = "direct"

    def __init__(self, blocks: Mapping[str, int]) -> None:
        sizes = set(blocks.values())
        if len(sizes) != 1:
            raise ValueError(
                f"direct coeffs need the same number of experts per block, got {blocks}"
            )
        self.blocks = dict(blocks)
        self.dim = sizes.pop()

    def plan(self, action: np.ndarray, context: np.ndarray | None = None) -> Plan:
        a = _as_action(action, self.dim)
        return {name: a.copy() for name in self.blocks}


class TaskRelative(TaskSimplex):
    """Action on Simplex(K) re-weighting the estimated mix: ``b = normalize((p + floor) * a)``,
    then the task-simplex plan of b (the centre of the simplex is the plug-in merge)."""

    name = "task-relative"

    def __init__(self, profiles: Mapping[str, np.ndarray], *, floor: float = 0.02) -> None:
        super().__init__(profiles)
        if not (np.isfinite(floor) and floor > 0):
            raise ValueError(f"floor must be > 0, got {floor}")
        self.floor = floor

    def plan(self, action: np.ndarray, context: np.ndarray | None = None) -> Plan:
        if context is None:
            raise ValueError("task-relative plans need the context (the estimated mix)")
        a = _as_action(action, self.dim)
        p = _as_action(context, self.dim)
        b = (p + self.floor) * a  # (K,)
        return super().plan(b / b.sum())


def make_space(dim: int) -> Any:
    """The bandit's action space for a parameterization (always a simplex here)."""
    from tanbr.bandit.spaces import Simplex

    return Simplex(dim)


PARAMETERIZATIONS: dict[str, Callable[..., TaskSimplex | Direct]] = {
    "task-simplex": TaskSimplex,
    "task-relative": TaskRelative,
    "direct": Direct,
}


def uniform_plan(blocks: Mapping[str, int]) -> Plan:
    """Every expert counts the same."""
    return {name: np.full(e, 1.0 / e) for name, e in blocks.items()}
