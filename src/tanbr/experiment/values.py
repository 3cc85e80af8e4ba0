"""The values an experiment passes around: what every run shares, and what one run produced.

They sit below everything that builds or reads them (set-up, runner, probes, summaries, the
worker pool), so no module has to import the driver to name them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tanbr.backend.protocol import Backend
from tanbr.backend.requests import Pool
from tanbr.experiment.config import ExperimentConfig
from tanbr.experiment.estimator import ClusterEstimator, ReadoutEstimator, TagEstimator, to_tasks
from tanbr.experiment.loop import Decision
from tanbr.experiment.modes import Baselines, PlanOf
from tanbr.experiment.records import SlotRecord

Progress = Callable[..., Any]  # (description, total, unit) -> a bar with update(n) / close()
Estimator = ClusterEstimator | ReadoutEstimator | TagEstimator


@dataclass(eq=False)
class Setup:
    """What every policy and seed of an experiment shares (built by
    :func:`tanbr.experiment.setup.prepare`)."""

    config: ExperimentConfig
    backend: Backend
    calib: Pool
    test: Pool
    estimator: Estimator  # fitted template, copied per run
    mapping: np.ndarray  # (K,) task type -> true task (evaluation only)
    plan_of: PlanOf  # the bandit policies' parameterization: (action, context) -> plan
    dim: int  # action-space dimension
    baselines: Baselines
    timings: dict[str, float] = field(default_factory=dict)
    profiles: Mapping[str, np.ndarray] = field(default_factory=dict)  # (K, E) per block

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.test.task_names


@dataclass(frozen=True, eq=False)
class SlotEvaluator:
    """Maps an estimated mix over task types onto the true tasks (for the TV distance).

    A type opened online maps to the majority task of the requests the estimator assigned to
    it so far (``count_new``, reading tags: evaluation only)."""

    mapping: np.ndarray
    n_tasks: int
    new_counts: list[np.ndarray] = field(default_factory=list)

    def count_new(self, types: np.ndarray, tasks: Sequence[int], n_known: int) -> None:
        types = np.asarray(types, dtype=np.int64)
        tasks_arr = np.asarray(tasks, dtype=np.int64)
        while len(self.new_counts) < int(types.max(initial=n_known - 1)) - n_known + 1:
            self.new_counts.append(np.zeros(self.n_tasks))
        for j, counts in enumerate(self.new_counts):
            counts += np.bincount(tasks_arr[types == n_known + j], minlength=self.n_tasks)

    def tasks_mix(self, est_mix: np.ndarray) -> np.ndarray:
        est_mix = np.asarray(est_mix, dtype=np.float64)
        extra = len(est_mix) - len(self.mapping)
        if extra <= 0:
            return to_tasks(est_mix, self.mapping, self.n_tasks)
        known = to_tasks(est_mix[: len(self.mapping)], self.mapping, self.n_tasks)
        for j in range(extra):  # an opened type with no assigned request yet counts as wrong
            if j < len(self.new_counts) and self.new_counts[j].sum() > 0:
                known[int(self.new_counts[j].argmax())] += est_mix[len(self.mapping) + j]
        return known


@dataclass(frozen=True)
class PolicyRun:
    """One policy on one seed: the slot records, the decisions of the probe slots (what the
    latency probes replay) and what the probes measured.

    ``e2e_ms`` and ``moe_ms`` are per probe batch (tokenizer to head, and MoE layers plus head
    from cached lower states); ``merge_probe_ms`` is an in-place re-merge of each probe's plan
    (merge decisions only); ``reads_mix``: the policy decides from the estimated mix, so the
    estimator's cost belongs to its served path."""

    policy: str
    seed: int
    records: list[SlotRecord]
    e2e_ms: list[float]
    moe_ms: list[float]
    seconds: float
    probes: tuple[Decision, ...] = ()
    merge_probe_ms: tuple[float, ...] = ()
    reads_mix: bool = False


@dataclass(frozen=True)
class RunResult:
    folder: Path
    summary: dict[str, Any]
    runs: list[PolicyRun]
