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

``task-tempered``: the same profiles, and a one-dimensional action that says how far to trust
the estimated mix: ``a = (w, 1 - w)`` on the 2-simplex, ``tau = tau_max * w`` and ``b =
normalize((p + floor) ** tau)``, then the absolute plan of b. The centre (tau = 1) is the
plug-in merge, ``w = 0`` the uniform one over the task types, ``w = 1`` a sharpened mix. A
correction that every context shares is learned from every slot, where a correction on the
K-simplex is learned per region of the simplex.

``direct``: the action lives on the simplex over the E experts and is shared by all blocks,
for models without task structure.

``task-regmean``: the action lives on the task simplex as in ``task-simplex``, but a block's
merge is not a weighted average of its experts: it is RegMean's least-squares merge of every
linear map from per-type statistics, ``W*(a) = (sum_k a_k B_k)(sum_k a_k A_k)^-1`` (see
:mod:`tanbr.model.task_regmean`), solved per decision into merged weights. It is both what the
policies act on and the absolute parameterization (plug-in is task-aware RegMean at the
estimated mix; the slot oracle's candidates are RegMean merges).

Every parameterization has ``plan(action, context=None)``; ``task-relative`` and
``task-tempered`` read the context (the estimated mix; :func:`reads_context`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from tanbr.backend.protocol import Plan
from tanbr.model.coeffs import MergedWeights, group_coeffs
from tanbr.model.task_regmean import TypeStats, task_regmean_merge
from tanbr.model.task_regmean import check_action as _as_action


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


def _positive(name: str, value: float) -> float:
    """``value`` checked finite and > 0 by the bandit world's check (imported when used, so
    that importing the experiment does not load every policy)."""
    from tanbr.bandit.base import check_positive

    return check_positive(name, value)


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


class GroupedTaskSimplex(TaskSimplex):
    """m merged experts per block, chosen from the same task-simplex action.

    The ``m - 1`` task types the action weighs most get a group of their own and the other
    types share the last one. An expert joins the group whose types use it most, weighted by
    the action (``argmax_g sum_{k in G_g} a_k U_{l,k,e}``); inside a group the coefficients are
    that weighted usage, normalised. The block's gate then routes each token to the group
    holding the experts it would have picked (:class:`~tanbr.model.blocks.GroupedBlock`). With
    m = 1 this is :class:`TaskSimplex` exactly; m is capped at the number of task types and of
    experts. Every group keeps at least one expert (the one it uses most among those of a
    group that has several), so the router always has m choices.
    """

    name = "grouped"

    def __init__(self, profiles: Mapping[str, np.ndarray], *, experts: int) -> None:
        super().__init__(profiles)
        if experts < 1:
            raise ValueError(f"merge.experts must be >= 1, got {experts}")
        self.experts = experts

    def plan(self, action: np.ndarray, context: np.ndarray | None = None) -> Plan:
        a = _as_action(action, self.dim)
        if self.experts == 1:
            return super().plan(a)
        order = np.argsort(-a, kind="stable")
        plan = {}
        for name, u in self.profiles.items():
            m = min(self.experts, self.dim, u.shape[1])
            types = [[int(k)] for k in order[: m - 1]] + [[int(k) for k in order[m - 1 :]]]
            usage = np.stack([(a[g, None] * u[g]).sum(0) for g in types])  # (m, E)
            owner = _owners(usage)
            weights = usage[owner, np.arange(u.shape[1])]  # (E,) each expert in its group
            groups = [tuple(np.flatnonzero(owner == g).tolist()) for g in range(m)]
            flat = weights + 1e-12  # an all-zero group still averages its members
            plan[name] = group_coeffs(flat / flat.sum(), groups, block=name)
        return plan


def _owners(usage: np.ndarray) -> np.ndarray:
    """(E,) the group of each expert: the group using it most, every group given at least one
    expert (taken from a group that has more than one)."""
    m = usage.shape[0]
    owner = usage.argmax(0)
    for g in range(m):
        if (owner == g).any():
            continue
        counts = np.bincount(owner, minlength=m)
        spare = np.flatnonzero(counts[owner] > 1)  # experts whose group can give one up
        owner[spare[int(np.argmax(usage[g, spare]))]] = g
    return np.asarray(owner)


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


class TaskRelative:
    """Action on Simplex(K) re-weighting the estimated mix: ``b = normalize((p + floor) * a)``,
    then the absolute plan of b (the centre of the simplex is the plug-in merge)."""

    name = "task-relative"

    def __init__(self, absolute: TaskSimplex, *, floor: float = 0.02) -> None:
        self.absolute = absolute
        self.dim = absolute.dim
        self.floor = _positive("floor", floor)

    def plan(self, action: np.ndarray, context: np.ndarray | None = None) -> Plan:
        if context is None:
            raise ValueError("task-relative plans need the context (the estimated mix)")
        a = _as_action(action, self.dim)
        p = _as_action(context, self.dim)
        b = (p + self.floor) * a  # (K,)
        return self.absolute.plan(b / b.sum())


class TaskTempered:
    """Action on Simplex(2) tempering the estimated mix: ``tau = tau_max * a_0``, ``b =
    normalize((p + floor) ** tau)``, then the absolute plan of b (the centre, tau = 1, is the
    plug-in merge; tau = 0 weighs the task types alike)."""

    name = "task-tempered"
    dim = 2

    def __init__(self, absolute: TaskSimplex, *, tau_max: float = 2.0, floor: float = 0.02) -> None:
        self.absolute = absolute
        self.tau_max = _positive("tau_max", tau_max)
        self.floor = _positive("floor", floor)

    def tau(self, action: np.ndarray) -> float:
        """The exponent an action stands for."""
        return float(self.tau_max * _as_action(action, self.dim)[0])

    def plan(self, action: np.ndarray, context: np.ndarray | None = None) -> Plan:
        if context is None:
            raise ValueError("task-tempered plans need the context (the estimated mix)")
        tau = self.tau(action)
        p = _as_action(context, self.absolute.dim)
        b = (p + self.floor) ** tau  # (K,); tau = 0 gives every type the same weight
        return self.absolute.plan(b / b.sum())


def make_space(dim: int) -> Any:
    """The bandit's action space for a parameterization (always a simplex here)."""
    from tanbr.bandit.spaces import Simplex

    return Simplex(dim)


class TaskRegMean:
    """Action on Simplex(K); every block's merged weights are task-aware RegMean's
    ``W*(a) = (sum_k a_k B_k)(sum_k a_k A_k)^-1`` per linear map (one solve per map and
    decision; the time it takes is charged to the merge that installs the plan).

    The last ``cache`` plans are kept by action: an action played again (the slot oracle's
    fixed candidates, a static policy) is served without a new solve and charged none. Each
    plan carries a key (the statistics' fingerprint and the action), so the prediction memo
    identifies it without hashing its megabytes of weights."""

    name = "task-regmean"

    def __init__(
        self,
        stats: Mapping[str, TypeStats],
        blocks: Mapping[str, int],
        *,
        ridge: float = 1e-6,
        cache: int = 4,
    ) -> None:
        if set(stats) != set(blocks):
            raise ValueError(
                f"task-regmean needs the statistics of every block {sorted(blocks)}, got "
                f"{sorted(stats)}"
            )
        dims = {s.n_types for s in stats.values()}
        if len(dims) != 1:
            raise ValueError(f"every block's statistics must have the same K, got {sorted(dims)}")
        for name, s in stats.items():
            if s.block.n_experts != blocks[name]:
                raise ValueError(
                    f"statistics of block {name!r} are for {s.block.n_experts} experts, the "
                    f"block has {blocks[name]}"
                )
        if cache < 0:
            raise ValueError(f"the plan cache holds >= 0 plans, got {cache}")
        self.stats = dict(stats)
        self.ridge = ridge
        self.dim = dims.pop()
        self.cache = cache
        self._plans: OrderedDict[bytes, dict[str, MergedWeights]] = OrderedDict()
        self._fingerprint = _fingerprint(self.stats, ridge)

    def plan(self, action: np.ndarray, context: np.ndarray | None = None) -> Plan:
        a = _as_action(action, self.dim)
        key = a.tobytes()
        hit = self._plans.get(key)
        if hit is not None:
            self._plans.move_to_end(key)
            return {name: dataclasses.replace(v, build_ms=0.0) for name, v in hit.items()}
        plan: dict[str, MergedWeights] = {}
        for name, s in self.stats.items():
            merged = task_regmean_merge(s, a, ridge=self.ridge)
            ident = self._fingerprint + name.encode() + b"\0" + key
            plan[name] = dataclasses.replace(merged, key=ident)
        if self.cache:
            self._plans[key] = plan
            while len(self._plans) > self.cache:
                self._plans.popitem(last=False)
        return plan

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the cached plans (worker processes build their own)."""
        state = dict(self.__dict__)
        state["_plans"] = OrderedDict()
        return state

    @property
    def nbytes(self) -> int:
        """Bytes of the per-type statistics A_k, B_k of every block."""
        return sum(s.nbytes for s in self.stats.values())


def _fingerprint(stats: Mapping[str, TypeStats], ridge: float) -> bytes:
    """sha256 of everything a task-aware RegMean plan depends on besides the action."""
    h = hashlib.sha256(repr(ridge).encode())
    for name in sorted(stats):
        s = stats[name]
        h.update(name.encode() + s.tokens.tobytes() + repr(s.alpha).encode())
        for part in (s.a, s.b, s.w_sum, s.averages):
            for target in sorted(part):
                h.update(target.encode())
                raw = part[target].detach().cpu().contiguous().reshape(-1)
                h.update(raw.view(torch.uint8).numpy().tobytes())  # any dtype, bfloat16 too
    return h.digest()


Parameterization = TaskSimplex | TaskRelative | TaskTempered | Direct | TaskRegMean
#: the per-type RegMean statistics of every block, computed when a parameterization asks (the
#: set-up passes a function that runs the calibration requests of each type through the MoE)
StatsSource = Callable[[], Mapping[str, TypeStats]]


class Builder(Protocol):
    """(profiles per block, experts per block, merged experts per block m, where the per-type
    RegMean statistics come from) -> (what the bandit policies act on, the absolute
    parameterization of the static merges: plug-in, the oracle's candidates)."""

    def __call__(
        self,
        profiles: Mapping[str, np.ndarray],
        blocks: Mapping[str, int],
        experts: int,
        stats: StatsSource | None,
        /,
    ) -> tuple[Parameterization, Parameterization]: ...


#: parameterizations whose actions are mixes over the task types (plug-in serves the mix)
MIX_ACTIONS = (TaskSimplex, TaskRegMean)


def _task_simplex(
    profiles: Mapping[str, np.ndarray],
    blocks: Mapping[str, int],
    experts: int,
    stats: StatsSource | None,
) -> tuple[Parameterization, Parameterization]:
    absolute = (
        GroupedTaskSimplex(profiles, experts=experts) if experts > 1 else TaskSimplex(profiles)
    )
    return absolute, absolute


@dataclasses.dataclass(frozen=True)
class _MixReader:
    """Builder of a parameterization whose plans start from the estimated mix: it wraps the
    absolute task simplex (plug-in and the oracle's candidates keep that one)."""

    wrap: Callable[[TaskSimplex], Parameterization]

    def __call__(
        self,
        profiles: Mapping[str, np.ndarray],
        blocks: Mapping[str, int],
        experts: int,
        stats: StatsSource | None,
    ) -> tuple[Parameterization, Parameterization]:
        _, absolute = _task_simplex(profiles, blocks, experts, stats)
        assert isinstance(absolute, TaskSimplex)
        return self.wrap(absolute), absolute


def _direct(
    profiles: Mapping[str, np.ndarray],
    blocks: Mapping[str, int],
    experts: int,
    stats: StatsSource | None,
) -> tuple[Parameterization, Parameterization]:
    if experts > 1:
        raise ValueError("merge.experts > 1 needs a task-simplex parameterization, not 'direct'")
    param = Direct(blocks)
    return param, param


def _task_regmean(
    profiles: Mapping[str, np.ndarray],
    blocks: Mapping[str, int],
    experts: int,
    stats: StatsSource | None,
) -> tuple[Parameterization, Parameterization]:
    if experts > 1:
        raise ValueError(
            "parameterization 'task-regmean' merges one dense expert per block; merge.experts "
            f"= {experts} (grouped merges) needs 'task-simplex'"
        )
    if stats is None:
        raise ValueError(
            "parameterization 'task-regmean' needs the per-type RegMean statistics of the "
            "calibration requests (computed by the experiment's set-up)"
        )
    param = TaskRegMean(stats(), blocks)
    return param, param


PARAMETERIZATIONS: dict[str, Builder] = {
    "task-simplex": _task_simplex,
    "task-relative": _MixReader(TaskRelative),
    "task-tempered": _MixReader(TaskTempered),
    "direct": _direct,
    "task-regmean": _task_regmean,
}


def reads_context(kind: str) -> bool:
    """Whether parameterization ``kind``'s plans start from the estimated mix."""
    return isinstance(PARAMETERIZATIONS.get(kind), _MixReader)


def build_parameterization(
    kind: str,
    profiles: Mapping[str, np.ndarray],
    blocks: Mapping[str, int],
    *,
    experts: int = 1,
    stats: StatsSource | None = None,
) -> tuple[Parameterization, Parameterization]:
    """The parameterization ``kind`` names, and the absolute one of the static merges.

    ``stats``: called (once) by a parameterization that needs the per-type RegMean statistics
    (``task-regmean``); the others never call it."""
    builder = PARAMETERIZATIONS.get(kind)
    if builder is None:
        raise ValueError(
            f"parameterization.kind must be one of {sorted(PARAMETERIZATIONS)}, got {kind!r}"
        )
    return builder(profiles, blocks, experts, stats)


def uniform_plan(blocks: Mapping[str, int]) -> Plan:
    """Every expert counts the same."""
    return {name: np.full(e, 1.0 / e) for name, e in blocks.items()}
