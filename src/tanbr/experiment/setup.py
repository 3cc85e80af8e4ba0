"""Set-up of an experiment: everything the policies share, computed once per model and config.

:func:`prepare` fits the estimator on unlabeled calibration requests, builds the task-type
profiles and the parameterization, the static baselines' plans and the slot oracle's candidate
table. Tags are read only where a yardstick needs them (the evaluation mapping, the task oracle's
merges, the oracle table), never by anything a policy decides with.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Mapping

import numpy as np

from tanbr.backend.protocol import Backend
from tanbr.backend.requests import Pool, Requests, pool_truth
from tanbr.backend.scorers import default_metric, make_scorer
from tanbr.experiment.config import EstimatorConfig, ExperimentConfig
from tanbr.experiment.estimator import (
    ClusterEstimator,
    ReadoutEstimator,
    TagEstimator,
    match_clusters,
)
from tanbr.experiment.modes import Baselines, OracleTable, candidate_actions
from tanbr.experiment.novelty import NoveltyDetector
from tanbr.experiment.parameterization import (
    MIX_ACTIONS,
    build_parameterization,
    cluster_profiles,
)
from tanbr.experiment.values import Estimator, Progress, Setup
from tanbr.model.task_regmean import TypeStats

log = logging.getLogger(__name__)

#: Static merges the set-up computes when a config's policies name them.
STATIC_MERGES = ("regmean", "fisher")


def _requests(pool: Pool) -> Requests:
    return Requests(pool.texts, pool.rows)


def _mean_rows(probs: np.ndarray) -> np.ndarray:
    c = np.asarray(probs, dtype=np.float64).mean(0)
    return np.asarray(c / c.sum())


def per_task_mean(scores: np.ndarray, pool: Pool) -> np.ndarray:
    """(n_tasks,) the mean score of each task's requests of the pool."""
    n = len(pool.task_names)
    sums = np.bincount(pool.tasks, weights=np.asarray(scores, dtype=np.float64), minlength=n)
    return np.asarray(sums / np.bincount(pool.tasks, minlength=n))


def evaluation_metric(config: ExperimentConfig, backend: Backend) -> str:
    """The scorer behind the reported accuracy: the config's, or the backend's natural one."""
    return config.evaluation.metric or default_metric(backend)


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


def without_task(pool: Pool, task: str) -> tuple[Pool, np.ndarray]:
    """The pool without one task (a task the calibration never contained), its tasks numbered
    0..n-2, and (n-1,) the original index of each remaining task."""
    if task not in pool.task_names:
        raise ValueError(f"workload.new_task must be one of {list(pool.task_names)}, got {task!r}")
    held = pool.task_names.index(task)
    kept = np.array([k for k in range(len(pool.task_names)) if k != held], dtype=np.int64)
    renumber = np.full(len(pool.task_names), -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    idx = np.flatnonzero(pool.tasks != held)
    reduced = Pool(
        tuple(pool.texts[i] for i in idx),
        renumber[pool.tasks[idx]],
        pool.labels[idx],
        tuple(pool.task_names[k] for k in kept),
        rows=None if pool.rows is None else np.asarray(pool.rows)[idx],
    )
    return reduced, kept


def _fit_cluster(
    cfg: EstimatorConfig, backend: Backend, calib: Pool, rng: np.random.Generator
) -> tuple[Estimator, np.ndarray]:
    """k-means task types on the served-path signatures of unlabeled calibration requests."""
    estimator = ClusterEstimator(
        rng=rng,
        n_types=cfg.n_types or None,
        forecast=cfg.forecast,
        alpha=cfg.alpha,
        beta=cfg.beta,
        prior_strength=cfg.prior_strength,
        online_rate=cfg.online_rate,
    )
    signatures = backend.signatures(_requests(calib))  # (n, d): no tags involved
    estimator.fit(signatures)
    return estimator, estimator.assign(signatures)


def _fit_readout(
    cfg: EstimatorConfig, backend: Backend, calib: Pool, rng: np.random.Generator
) -> tuple[Estimator, np.ndarray]:
    """Task types by k-means on the ``types`` signature of unlabeled calibration requests
    (a one-off full-MoE pass), read out from the served-path signature."""
    requests = _requests(calib)
    t0 = time.perf_counter()
    rich = backend.features(requests, cfg.types)  # (n, d'): once, offline
    full_pass_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(requests))
    typer = ClusterEstimator(rng=rng, n_types=cfg.n_types or None).fit(rich)
    types = typer.assign(rich)
    novelty = None
    if cfg.novelty:
        novelty = NoveltyDetector(window=cfg.novelty_window, excess=cfg.novelty_excess)
    estimator = ReadoutEstimator(
        forecast=cfg.forecast,
        alpha=cfg.alpha,
        beta=cfg.beta,
        prior_strength=cfg.prior_strength,
        readout_c=cfg.readout_c,
        novelty=novelty,
        profile_budget=cfg.profile_budget,
        full_pass_ms=full_pass_ms,  # what a profile's gate pass is charged per request
    ).fit(backend.signatures(requests), types)
    return estimator, types


def _fit_oracle(
    cfg: EstimatorConfig, backend: Backend, calib: Pool, rng: np.random.Generator
) -> tuple[Estimator, np.ndarray]:
    """The oracle estimator (a baseline): the true tags are the task types."""
    estimator = TagEstimator(
        n_types=len(calib.task_names),
        forecast=cfg.forecast,
        alpha=cfg.alpha,
        beta=cfg.beta,
        prior_strength=cfg.prior_strength,
    )
    return estimator, calib.tasks


#: estimator.kind -> how it is fitted on the calibration pool: (estimator, task type per request)
ESTIMATOR_FITS: dict[
    str,
    Callable[[EstimatorConfig, Backend, Pool, np.random.Generator], tuple[Estimator, np.ndarray]],
] = {"cluster": _fit_cluster, "readout": _fit_readout, "oracle": _fit_oracle}


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
    full_calib = calib
    kept = np.arange(len(calib.task_names))
    if config.workload.new_task:  # held out of calibration: it arrives mid-stream
        calib, kept = without_task(calib, config.workload.new_task)
    if est_cfg.novelty and est_cfg.kind != "readout":
        raise ValueError("estimator.novelty needs estimator.kind = 'readout'")
    calib_requests = _requests(calib)
    fit = ESTIMATOR_FITS.get(est_cfg.kind)
    if fit is None:
        known = ", ".join(repr(k) for k in ESTIMATOR_FITS)
        raise ValueError(f"estimator.kind must be one of {known}, got {est_cfg.kind!r}")
    estimator, assign = fit(est_cfg, backend, calib, rng)
    k = estimator.n_types
    mapping = kept[match_clusters(assign, calib.tasks, k, len(calib.task_names))]
    timings["estimator_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gates = backend.gate_probs(calib_requests)  # block -> (n, E), full MoE, label-free
    frequency_plan = {name: _mean_rows(p) for name, p in gates.items()}
    full_gates = backend.gate_probs(_requests(full_calib)) if full_calib is not calib else gates
    task_plans = tuple(
        {name: _mean_rows(p[full_calib.tasks == t]) for name, p in full_gates.items()}
        for t in range(n_tasks)
    )  # reads tags: the task oracle only (it knows every task, held out or not)
    profiles = cluster_profiles(assign, gates, k)

    def type_stats() -> Mapping[str, TypeStats]:  # task-regmean: label-free, the estimator's types
        t1 = time.perf_counter()
        stats = backend.task_regmean_stats(calib_requests, assign, k)
        timings["type_stats_s"] = time.perf_counter() - t1
        return stats

    param, absolute = build_parameterization(
        config.parameterization.kind,
        profiles,
        backend.blocks,
        experts=config.merge.experts,
        stats=type_stats,
    )
    timings["profiles_s"] = time.perf_counter() - t0 - timings.get("type_stats_s", 0.0)

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
    truth = pool_truth(scored)
    metric = make_scorer(evaluation_metric(config, backend))
    bar = progress("oracle table", len(candidates), "merge") if progress else None
    for c, action in enumerate(candidates):
        backend.merge(absolute.plan(action))
        predictions = backend.predict(test_requests).predictions
        acc[c] = per_task_mean(metric.score(backend, test_requests, predictions, truth), scored)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # the full MoE again, without reading every expert of a memory-lean model (a service's
    # start would otherwise peak at the full MoE's size): what needs them reads them then
    backend.restore(streamed=True)
    timings["oracle_table_s"] = time.perf_counter() - t0
    oracle = OracleTable(candidates, acc)
    log.info(
        "prepared: K=%d task types, %d oracle candidates (best per task %s)",
        k,
        len(candidates),
        np.round(acc.max(0), 3).tolist(),
    )
    t0 = time.perf_counter()
    static_plans = {
        name: backend.static_plan(name, calib_requests)
        for name in STATIC_MERGES
        if name in config.policies
    }  # label-free: calibration requests without their tags
    timings["static_merges_s"] = time.perf_counter() - t0
    baselines = Baselines(
        blocks=backend.blocks,
        frequency_plan=frequency_plan,
        task_plans=task_plans,
        oracle=oracle,
        plan_of=absolute.plan,
        task_simplex=isinstance(absolute, MIX_ACTIONS),
        static_plans=static_plans,
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
        profiles=profiles,
    )
