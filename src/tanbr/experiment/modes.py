"""How each policy name is served in the loop.

Bandit policies (the names in :data:`tanbr.bandit.POLICIES`: ``tanbr``, ``neural-grid``,
``hoo``, ``linucb-grid``, ``egreedy-grid``, ``random``, ...) select an action from the
estimated mix and the parameterization turns it into a plan. The other baselines are
non-learning modes, and take precedence over a bandit policy of the same name:

- ``full-moe``: the original model with its top-k gate (no merging);
- ``uniform``: every expert weighted equally, every slot (the paper's plain average);
- ``regmean``, ``fisher``: RegMean and Fisher-weighted averaging, computed once with the full
  MoE on unlabeled calibration requests (the paper's static merges);
- ``frequency``: the usage-frequency merge (MC-SMoE style): each block's coeffs are its overall
  mean gate probabilities on unlabeled calibration requests, static;
- ``smear``: token-level soft merging (SMEAR style): each input gets its own merge from its
  gate probabilities;
- ``plug-in``: the estimated mix is the action in the task simplex (task-aware, no learning);
- ``task-oracle``: each request served by its own task's merge, reading the true tags (the
  ceiling no single merge can always reach);
- ``slot-oracle``: the best single merge for the slot's true mix, found in a table of per-task
  accuracies over candidate merges (the yardstick of regret).

Adding a non-bandit mode is one class and one line in :data:`MODES`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tanbr.backend.protocol import Plan
from tanbr.backend.requests import Truth
from tanbr.experiment.loop import Choice


@dataclass(frozen=True, eq=False)
class OracleTable:
    """Per-task accuracies of candidate merges: ``acc[c, k]`` of candidate action c on task k.

    A slot's oracle value is ``max_c sum_k mix_k acc[c, k]`` (the slot's accuracy is the
    mix-weighted sum of per-task accuracies, so the search is one matrix product).
    """

    actions: np.ndarray  # (C, K) candidate actions in the parameterization's space
    acc: np.ndarray  # (C, n_tasks)

    def __post_init__(self) -> None:
        if self.actions.ndim != 2 or self.acc.ndim != 2 or len(self.actions) != len(self.acc):
            raise ValueError(
                f"oracle table: actions {self.actions.shape} and acc {self.acc.shape} disagree"
            )

    def best(self, mix: np.ndarray) -> tuple[int, float]:
        """The best candidate for a true mix over tasks, and its expected accuracy."""
        values = self.acc @ np.asarray(mix, dtype=float)  # (C,)
        c = int(values.argmax())
        return c, float(values[c])


@dataclass(frozen=True, eq=False)
class Baselines:
    """What the non-bandit modes need, computed once per model (see ``runner.prepare``)."""

    blocks: Mapping[str, int]
    frequency_plan: Plan | None = None
    task_plans: tuple[Plan, ...] = ()
    oracle: OracleTable | None = None
    plan_of: Callable[[np.ndarray], Plan] | None = None  # absolute merges: oracle, plug-in
    task_simplex: bool = True  # plan_of is the task simplex (its actions are mixes)
    static_plans: Mapping[str, Plan] = field(default_factory=dict)  # regmean, fisher
    extra: dict[str, Any] = field(default_factory=dict)


PlanOf = Callable[[np.ndarray, np.ndarray], Plan]  # (action, context) -> plan


class BanditMode:
    """A bandit policy over the parameterization's action space; learns from rewards."""

    learns = True
    needs_truth = False
    reads_mix = True
    all_experts = False  # serves merges only

    def __init__(self, name: str, policy: Any, plan_of: PlanOf) -> None:
        self.name = name
        self.policy = policy
        self.plan_of = plan_of

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        action = np.asarray(self.policy.select(mix), dtype=np.float64)
        return Choice("merge", action=action, plan=self.plan_of(action, mix))

    def learn(
        self,
        mix: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        self.policy.update(mix, action, reward, type_rewards=type_rewards)


class _Fixed:
    learns = False
    needs_truth = False
    reads_mix = False
    # serves every original expert (the full MoE, soft merging): a service's two replicas
    # then share them, read once; otherwise a memory-lean service never holds them all
    all_experts = False
    name = "fixed"

    def learn(
        self,
        mix: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        raise ValueError(f"mode {self.name!r} does not learn")


class FullMoE(_Fixed):
    name = "full-moe"
    all_experts = True

    def __init__(self, baselines: Baselines) -> None:
        pass

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        return Choice("full")


class Smear(_Fixed):
    name = "smear"
    all_experts = True

    def __init__(self, baselines: Baselines) -> None:
        pass

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        return Choice("soft")


class Uniform(_Fixed):
    name = "uniform"

    def __init__(self, baselines: Baselines) -> None:
        self.plan = {n: np.full(e, 1.0 / e) for n, e in baselines.blocks.items()}

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        return Choice("merge", plan=self.plan)


class Frequency(_Fixed):
    name = "frequency"

    def __init__(self, baselines: Baselines) -> None:
        if baselines.frequency_plan is None:
            raise ValueError("the frequency baseline needs calibration gate statistics")
        self.plan = baselines.frequency_plan

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        return Choice("merge", plan=self.plan)


class StaticMerge(_Fixed):
    """A static merge computed once on unlabeled calibration requests with the full MoE and
    served every slot: RegMean (``regmean``) or Fisher-weighted averaging (``fisher``), the
    paper's static baselines beside the plain average (``uniform``)."""

    def __init__(self, baselines: Baselines, name: str) -> None:
        plan = baselines.static_plans.get(name)
        if plan is None:
            raise ValueError(f"the {name!r} merge was not computed in the set-up")
        self.name = name
        self.plan = plan

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        return Choice("merge", plan=self.plan)


class PlugIn(_Fixed):
    """The estimated mix is the action in the task simplex (task-aware, no learning).

    Served as a fixed rule on the absolute parameterization whose actions are mixes: the task
    simplex (whatever parameterization the bandit policies use, so the baseline means the same
    in every run), or with ``task-regmean`` task-aware RegMean at the estimated mix."""

    name = "plug-in"
    reads_mix = True

    def __init__(self, baselines: Baselines) -> None:
        if baselines.plan_of is None or not baselines.task_simplex:
            raise ValueError("plug-in needs the task-simplex parameterization (action = mix)")
        self.plan_of = baselines.plan_of

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        action = np.asarray(mix, dtype=np.float64)
        return Choice("merge", action=action, plan=self.plan_of(action))


class TaskOracle(_Fixed):
    name = "task-oracle"
    needs_truth = True

    def __init__(self, baselines: Baselines) -> None:
        if not baselines.task_plans:
            raise ValueError("the task oracle needs each task's merge (calibration, with tags)")
        self.task_plans = baselines.task_plans

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        if truth is None:
            raise ValueError("the task oracle reads the true task tags")
        return Choice("per-task", task_plans=self.task_plans)


class SlotOracle(_Fixed):
    name = "slot-oracle"
    needs_truth = True

    def __init__(self, baselines: Baselines) -> None:
        if baselines.oracle is None or baselines.plan_of is None:
            raise ValueError("the slot oracle needs the candidate table")
        self.table = baselines.oracle
        self.plan_of = baselines.plan_of

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice:
        if truth is None:
            raise ValueError("the slot oracle reads the slot's true mix")
        c, _ = self.table.best(truth.mix)
        action = self.table.actions[c]
        return Choice("merge", action=action, plan=self.plan_of(action))


ModeFactory = Callable[[Baselines], Any]

MODES: dict[str, ModeFactory] = {
    "full-moe": FullMoE,
    "uniform": Uniform,
    "frequency": Frequency,
    "smear": Smear,
    "plug-in": PlugIn,
    "regmean": functools.partial(StaticMerge, name="regmean"),
    "fisher": functools.partial(StaticMerge, name="fisher"),
    "task-oracle": TaskOracle,
    "slot-oracle": SlotOracle,
}


def mode_names() -> list[str]:
    """Every servable name: the non-bandit modes and the bandit registry."""
    from tanbr.bandit import POLICIES

    return sorted(set(MODES) | set(POLICIES))


def make_mode(
    name: str,
    *,
    baselines: Baselines,
    space: Any = None,
    context_dim: int = 0,
    plan_of: PlanOf | None = None,
    rng: np.random.Generator | None = None,
    params: Mapping[str, Any] | None = None,
) -> Any:
    """Build the mode for a policy name (a bandit policy needs space, context_dim, plan_of
    and rng; ``params`` go to the policy factory)."""
    if name in MODES:
        if params:
            raise ValueError(f"{name!r} takes no parameters, got {sorted(params)}")
        return MODES[name](baselines)
    from tanbr.bandit import POLICIES, make_policy

    if name not in POLICIES:
        import difflib

        known = sorted(set(MODES) | set(POLICIES))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown policy {name!r}{hint}; known: {', '.join(known)}")
    if space is None or plan_of is None or rng is None or context_dim < 1:
        raise ValueError(f"bandit policy {name!r} needs an action space, plan_of, rng, context_dim")
    try:
        policy = make_policy(
            name, space=space, context_dim=context_dim, rng=rng, **dict(params or {})
        )
    except TypeError as err:  # a wrong parameter name in [policy.NAME]
        raise ValueError(f"[policy.{name}]: {err}") from None
    return BanditMode(name, policy, plan_of)


DENSE_ORACLE_DIM = 8  # beyond it the edge quarters alone would be thousands of candidates


def candidate_actions(
    dim: int, *, n_random: int, concentration: float, rng: np.random.Generator
) -> np.ndarray:
    """Slot-oracle candidates on Simplex(dim), (C, dim): the vertices, the centre, every edge's
    midpoint and, up to ``DENSE_ORACLE_DIM`` dimensions, its points at 1/4 and 3/4 and the
    vertices and midpoints moved 30% of the way to the centre; then ``n_random`` Dirichlet
    samples.

    Slots are usually dominated by one to three tasks, so the best single merge lies near a
    vertex or an edge; the points pulled towards the centre are there because merges that keep
    some weight on every expert often serve a mix better than the mix itself does.
    """
    eye = np.eye(dim)
    centre = np.full((1, dim), 1.0 / dim)
    parts: list[np.ndarray] = [eye, centre]
    midpoints = [(eye[i] + eye[j]) / 2 for i in range(dim) for j in range(i + 1, dim)]
    if midpoints:
        parts.append(np.asarray(midpoints))
    if midpoints and dim <= DENSE_ORACLE_DIM:
        quarters = [
            f * eye[i] + (1.0 - f) * eye[j]
            for i in range(dim)
            for j in range(i + 1, dim)
            for f in (0.25, 0.75)
        ]
        parts.append(np.asarray(quarters))
        parts.append(0.7 * np.vstack([eye, np.asarray(midpoints)]) + 0.3 * centre)
    if n_random > 0:
        parts.append(rng.dirichlet(np.full(dim, concentration), size=n_random))
    return np.vstack(parts)
