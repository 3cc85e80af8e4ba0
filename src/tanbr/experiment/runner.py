"""Run policies x seeds through the slot loop and write a run folder.

:func:`prepare` computes, once per model and config, everything the policies share: the
estimator fitted on unlabeled calibration requests, the task-type profiles and the
parameterization, the static baselines' plans and the slot oracle's candidate table.
:func:`execute` then draws one stream per seed (the same for every policy of that seed), runs
each policy with :func:`~tanbr.experiment.loop.run_slot`, measures end-to-end latency on real
batches, and writes ``config.toml``, ``trace.jsonl``, ``summary.json`` and the plots.
"""

from __future__ import annotations

import copy
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tanbr.experiment.config import ExperimentConfig, write_config
from tanbr.experiment.estimator import (
    ClusterEstimator,
    TagEstimator,
    match_clusters,
    to_tasks,
)
from tanbr.experiment.loop import (
    Backend,
    Decision,
    Labelling,
    System,
    run_slot,
)
from tanbr.experiment.modes import (
    MODES,
    Baselines,
    OracleTable,
    PlanOf,
    candidate_actions,
    make_mode,
)
from tanbr.experiment.parameterization import (
    Direct,
    TaskRelative,
    TaskSimplex,
    cluster_profiles,
    make_space,
)
from tanbr.experiment.probes import last_decision, probe_latency, probe_slots, time_probes
from tanbr.experiment.records import SlotRecord, write_json, write_trace
from tanbr.experiment.reward import RewardFn
from tanbr.experiment.slots import Requests, Slot, Truth
from tanbr.experiment.summary import summarize
from tanbr.experiment.workload import (
    SCHEDULES,
    Pool,
    draw_slots,
    read_mix_trace,
    read_request_trace,
)

log = logging.getLogger(__name__)

Progress = Callable[..., Any]  # (description, total, unit) -> a bar with update(n) / close()


@dataclass(eq=False)
class Setup:
    """What every policy and seed of an experiment shares (built by :func:`prepare`)."""

    config: ExperimentConfig
    backend: Backend
    calib: Pool
    test: Pool
    estimator: ClusterEstimator | TagEstimator  # fitted template, copied per run
    mapping: np.ndarray  # (K,) task type -> true task (evaluation only)
    plan_of: PlanOf  # the bandit policies' parameterization: (action, context) -> plan
    dim: int  # action-space dimension
    baselines: Baselines
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.test.task_names


@dataclass(frozen=True, eq=False)
class SlotEvaluator:
    """TV distance through the cluster-to-task matching, and the slot oracle's value."""

    mapping: np.ndarray
    n_tasks: int
    oracle: OracleTable

    def tasks_mix(self, est_mix: np.ndarray) -> np.ndarray:
        return to_tasks(est_mix, self.mapping, self.n_tasks)

    def oracle_accuracy(self, truth: Truth) -> float:
        return self.oracle.best(truth.mix)[1]


def _requests(pool: Pool) -> Requests:
    return Requests(pool.texts, pool.rows)


def _mean_rows(probs: np.ndarray) -> np.ndarray:
    c = np.asarray(probs, dtype=np.float64).mean(0)
    return np.asarray(c / c.sum())


def per_task_accuracy(predictions: np.ndarray, pool: Pool) -> np.ndarray:
    """(n_tasks,) accuracy of predictions on each task of the pool."""
    correct = (np.asarray(predictions) == pool.labels).astype(float)
    n = len(pool.task_names)
    hits = np.bincount(pool.tasks, weights=correct, minlength=n)
    return np.asarray(hits / np.bincount(pool.tasks, minlength=n))


def first_per_task(pool: Pool, n: int) -> Pool:
    """The first ``n`` requests of every task of a pool (the whole pool when n is 0)."""
    if n <= 0:
        return pool
    idx = np.sort(np.concatenate([group[:n] for group in pool.by_task]))
    return Pool(
        tuple(pool.texts[i] for i in idx),
        pool.tasks[idx],
        pool.labels[idx],
        pool.task_names,
        rows=None if pool.rows is None else np.asarray(pool.rows)[idx],
    )


def prepare(
    config: ExperimentConfig,
    backend: Backend,
    calib: Pool,
    test: Pool,
    *,
    progress: Progress | None = None,
) -> Setup:
    """Fit the estimator and profiles on calibration data, and build the baselines' inputs.

    The estimator, the profiles and the ``frequency`` merge see calibration requests without
    their tags. Tags are read only for the evaluation mapping (Hungarian matching), the task
    oracle's per-task merges, and the slot oracle's per-task accuracies.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    est_cfg = config.estimator
    rng = np.random.default_rng(zlib.crc32(b"prepare"))
    n_tasks = len(test.task_names)
    if calib.task_names != test.task_names:
        raise ValueError("calibration and test pools must have the same tasks")
    calib_requests = _requests(calib)
    estimator: ClusterEstimator | TagEstimator
    if est_cfg.kind == "cluster":
        estimator = ClusterEstimator(
            rng=rng,
            n_types=est_cfg.n_types or None,
            forecast=est_cfg.forecast,
            alpha=est_cfg.alpha,
            beta=est_cfg.beta,
            prior_strength=est_cfg.prior_strength,
            online_rate=est_cfg.online_rate,
        )
        signatures = backend.signatures(calib_requests)  # (n, d): no tags involved
        estimator.fit(signatures)
        assign = estimator.assign(signatures)
    elif est_cfg.kind == "oracle":
        estimator = TagEstimator(
            n_types=n_tasks,
            forecast=est_cfg.forecast,
            alpha=est_cfg.alpha,
            beta=est_cfg.beta,
            prior_strength=est_cfg.prior_strength,
        )
        assign = calib.tasks
    else:
        raise ValueError(f"estimator.kind must be 'cluster' or 'oracle', got {est_cfg.kind!r}")
    k = estimator.n_types
    mapping = match_clusters(assign, calib.tasks, k, n_tasks)
    timings["estimator_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gates = backend.gate_probs(calib_requests)  # block -> (n, E), full MoE, label-free
    frequency_plan = {name: _mean_rows(p) for name, p in gates.items()}
    task_plans = tuple(
        {name: _mean_rows(p[calib.tasks == t]) for name, p in gates.items()} for t in range(n_tasks)
    )  # reads tags: the task oracle only
    kind = config.parameterization.kind
    param: TaskSimplex | Direct
    absolute: TaskSimplex | Direct  # static merges: the oracle's candidates, plug-in
    if kind in ("task-simplex", "task-relative"):
        profiles = cluster_profiles(assign, gates, k)
        absolute = TaskSimplex(profiles)
        param = absolute if kind == "task-simplex" else TaskRelative(profiles)
    elif kind == "direct":
        param = absolute = Direct(backend.blocks)
    else:
        raise ValueError(
            "parameterization.kind must be 'task-simplex', 'task-relative' or 'direct', "
            f"got {kind!r}"
        )
    timings["profiles_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    candidates = candidate_actions(
        absolute.dim,
        n_random=config.oracle.n_candidates,
        concentration=config.oracle.concentration,
        rng=rng,
    )
    acc = np.zeros((len(candidates), n_tasks))
    scored = first_per_task(test, config.oracle.rows_per_task)
    test_requests = _requests(scored)
    bar = progress("oracle table", len(candidates), "merge") if progress else None
    for c, action in enumerate(candidates):
        backend.merge(absolute.plan(action))
        probs = backend.predict(test_requests).probs
        acc[c] = per_task_accuracy(np.asarray(probs).argmax(1), scored)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    backend.restore()
    timings["oracle_table_s"] = time.perf_counter() - t0
    oracle = OracleTable(candidates, acc)
    log.info(
        "prepared: K=%d task types, %d oracle candidates (best per task %s)",
        k,
        len(candidates),
        np.round(acc.max(0), 3).tolist(),
    )
    baselines = Baselines(
        blocks=backend.blocks,
        frequency_plan=frequency_plan,
        task_plans=task_plans,
        oracle=oracle,
        plan_of=absolute.plan,
        task_simplex=isinstance(absolute, TaskSimplex),
    )
    return Setup(
        config=config,
        backend=backend,
        calib=calib,
        test=test,
        estimator=estimator,
        mapping=mapping,
        plan_of=param.plan,
        dim=param.dim,
        baselines=baselines,
        timings=timings,
    )


# --- streams and systems ------------------------------------------------------------------------


def make_slots(setup: Setup, seed: int) -> list[Slot]:
    """The stream of one seed (identical for every policy of that seed)."""
    cfg = setup.config.workload
    rng = np.random.default_rng([seed, zlib.crc32(b"workload")])
    n_tasks = len(setup.task_names)
    if cfg.kind == "requests":
        if not cfg.requests:
            raise ValueError("workload.kind 'requests' needs workload.requests (a trace file)")
        return read_request_trace(cfg.requests, setup.test)[: setup.config.n_slots]
    if cfg.kind == "trace":
        if not cfg.trace:
            raise ValueError("workload.kind 'trace' needs workload.trace (a mix trace file)")
        mixes = read_mix_trace(cfg.trace, setup.task_names)[: setup.config.n_slots]
    elif cfg.kind in SCHEDULES:
        table: dict[str, dict[str, Any]] = {
            "stationary": {"mix": list(cfg.mix) or None},
            "switch": {
                "n_dominant": cfg.n_dominant,
                "dominance": cfg.dominance,
                "period": cfg.period,
            },
            "periodic": {"period": cfg.period, "sharpness": cfg.sharpness},
            "random-walk": {"concentration": cfg.concentration},
            "drift": {
                "n_dominant": cfg.n_dominant,
                "dominance": cfg.dominance,
                "period": cfg.period,
                "ramp": cfg.ramp,
                "jitter": cfg.jitter,
            },
        }
        params = table[cfg.kind]
        mixes = SCHEDULES[cfg.kind](
            n_slots=setup.config.n_slots, n_tasks=n_tasks, rng=rng, **params
        )
    else:
        known = sorted([*SCHEDULES, "trace", "requests"])
        raise ValueError(f"workload.kind must be one of {known}, got {cfg.kind!r}")
    return draw_slots(setup.test, mixes, slot_size=cfg.slot_size, rng=rng)


def build_system(setup: Setup, name: str, seed: int) -> System:
    """A fresh system for one policy and seed: estimator copied from the fitted template."""
    cfg = setup.config
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    estimator = copy.deepcopy(setup.estimator)
    if isinstance(estimator, ClusterEstimator):
        estimator.rng = np.random.default_rng([seed, 7])
    mode = make_mode(
        name,
        baselines=setup.baselines,
        space=make_space(setup.dim),
        context_dim=estimator.n_types,
        plan_of=setup.plan_of,
        rng=rng,
        params=_policy_params(cfg, name),
    )
    return System(
        backend=setup.backend,
        estimator=estimator,
        mode=mode,
        reward=RewardFn(
            kind=cfg.reward.kind,
            latency_budget_ms=cfg.reward.latency_budget_ms,
            latency_weight=cfg.reward.latency_weight,
            memory_budget_bytes=cfg.reward.memory_budget_bytes,
            memory_weight=cfg.reward.memory_weight,
        ),
        labelling=Labelling(
            fraction=cfg.reward.label_fraction,
            delay=cfg.reward.delay,
            probe=cfg.reward.probe,
            sample=cfg.evaluation.sample,
        ),
        head=cfg.estimator.head,
        rng=np.random.default_rng([seed, zlib.crc32(name.encode()), 1]),
    )


def _policy_params(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """``[policy.NAME]`` of the config. Under ``task-relative`` the parameterization already
    re-weights the mix, so Tanbr's own context-anchored chart would re-weight it twice: Tanbr
    then works on the plain simplex unless the config names a chart."""
    params = dict(cfg.policy.get(name, {}))
    if name == "tanbr" and cfg.parameterization.kind == "task-relative":
        params.setdefault("chart", "absolute")
    return params


@dataclass(frozen=True)
class PolicyRun:
    """One policy on one seed: the slot records, the latency probes (ms per batch) and the
    decisions of the probe slots (what the probes replay)."""

    policy: str
    seed: int
    records: list[SlotRecord]
    e2e_ms: list[float]
    moe_ms: list[float]
    seconds: float
    probes: tuple[Decision, ...] = ()


def run_policy(
    setup: Setup,
    name: str,
    seed: int,
    slots: Sequence[Slot],
    *,
    bar: Any = None,
    probe: bool = True,
) -> PolicyRun:
    """Serve a stream with one policy, then (``probe``) time real batches of its probe slots.

    ``bar`` is an optional progress bar (``update(n)``, ``set_description(str)``). Without
    ``probe`` the decisions to replay are kept in the run, for :func:`probe_latency`."""
    t0 = time.perf_counter()
    system = build_system(setup, name, seed)
    evaluator = SlotEvaluator(setup.mapping, len(setup.task_names), setup.baselines.oracle)  # type: ignore[arg-type]
    records: list[SlotRecord] = []
    decisions: list[Decision] = []
    keep = probe_slots(setup, seed, len(slots))
    if bar is not None:
        bar.set_description(f"{name} (seed {seed})")
    for slot in slots:
        record = run_slot(system, slot, evaluator=evaluator, seed=seed)
        records.append(record)
        if slot.index in keep:
            decisions.append(last_decision(system))
        if bar is not None:
            bar.update(1)
    e2e: list[float] = []
    moe: list[float] = []
    if probe:
        e2e, moe = time_probes(setup, system, [s for s in slots if s.index in keep], decisions)
    setup.backend.restore()
    return PolicyRun(name, seed, records, e2e, moe, time.perf_counter() - t0, tuple(decisions))


# --- the whole experiment -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    folder: Path
    summary: dict[str, Any]
    runs: list[PolicyRun]


def new_run_folder(out: Path, name: str) -> Path:
    """``out/NAME-YYYYmmdd-HHMMSS`` (suffixed if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = out / f"{name}-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = out / f"{name}-{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def execute(
    setup: Setup,
    *,
    out: Path,
    progress: Progress | None = None,
    plots: bool = True,
    workers: int = 1,
    backend_factory: Callable[[], Backend] | None = None,
) -> RunResult:
    """Every policy x seed of the config; writes the run folder and returns the summary.

    With ``workers`` > 1 the (policy, seed) runs are spread over that many processes, each
    serving with its own copy of the model made by ``backend_factory`` (a picklable callable);
    the results are the same as with one process. The latency probes always run afterwards in
    this process, interleaved across policies (:func:`probe_latency`)."""
    cfg = setup.config
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and backend_factory is None:
        raise ValueError("workers > 1 needs a backend_factory (each process builds its model)")
    unknown = [p for p in cfg.policies if p not in MODES and not _is_bandit(p)]
    if unknown:
        make_mode(unknown[0], baselines=setup.baselines)  # raises with close matches
    folder = new_run_folder(out, cfg.name)
    write_config(folder / "config.toml", cfg)
    t0 = time.perf_counter()
    streams = {seed: make_slots(setup, seed) for seed in cfg.seeds}
    total = sum(len(slots) for slots in streams.values()) * len(cfg.policies)
    bar = progress("slots", total) if progress else None
    try:
        if workers > 1:
            assert backend_factory is not None
            from tanbr.experiment.parallel import run_parallel

            runs = run_parallel(setup, streams, workers, backend_factory, bar)
        else:
            runs = [
                run_policy(setup, name, seed, slots, bar=bar, probe=False)
                for seed, slots in streams.items()
                for name in cfg.policies
            ]
    finally:
        setup.backend.restore()
        if bar is not None:
            bar.close()
    t_probe = time.perf_counter()
    runs = probe_latency(setup, runs, streams)
    setup.timings["probes_s"] = time.perf_counter() - t_probe
    write_trace(folder / "trace.jsonl", (r for run in runs for r in run.records))
    summary = summarize(runs)
    summary["timings"] = {**setup.timings, "runs_s": time.perf_counter() - t0}
    summary["tasks"] = list(setup.task_names)
    summary["n_types"] = setup.estimator.n_types
    write_json(folder / "summary.json", summary)
    if plots:
        from tanbr.experiment.plots import plot_run

        plot_run(folder)
    from tanbr.experiment.report import write_report

    write_report([folder], folder / "report.md")
    return RunResult(folder, summary, runs)


def _is_bandit(name: str) -> bool:
    from tanbr.bandit import POLICIES

    return name in POLICIES
