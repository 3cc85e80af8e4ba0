"""What any served model and its merges are worth per task, through the backend seam.

``tanbr eval-model --model PATH --tasks FILE`` on a checkpoint of your own: the evaluation
metric (label accuracy for a classifier, likelihood for a language model) of the full MoE and of
plain merges on each task's test requests: the uniform merge, the usage-frequency merge, and
each task's own merge (its requests' mean gate probabilities on the calibration split: the
merge the task-tag oracle serves), plus the end-to-end latency of a merged batch against the
full MoE's, timed side by side. The embedded default model has a richer report
(:mod:`tanbr.model.default.evaluate`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tanbr.backend.protocol import Backend, Plan
from tanbr.backend.registry import BackendSpec
from tanbr.backend.requests import Pool, Requests, pool_truth
from tanbr.backend.scorers import default_metric, make_scorer
from tanbr.experiment.setup import per_task_mean


@dataclass(frozen=True)
class BackendEval:
    """Settings: timed repeats per latency median, and the batch size timed."""

    repeats: int = 7
    batch_size: int = 32


def _mean_rows(probs: np.ndarray) -> np.ndarray:
    c = np.asarray(probs, dtype=np.float64).mean(0)
    return np.asarray(c / c.sum())


def evaluate_backend(spec: BackendSpec, settings: BackendEval | None = None) -> dict[str, Any]:
    """The per-task metric of the full MoE and of plain merges, and the latency of a merge."""
    settings = settings or BackendEval()
    backend, calib, test = spec.replace(memo=False).load()
    metric = make_scorer(default_metric(backend))
    gates = backend.gate_probs(Requests(calib.texts, calib.rows))  # reads no tag
    plans: dict[str, Plan | None] = {
        "full_moe": None,
        "uniform": {n: np.full(e, 1.0 / e) for n, e in backend.blocks.items()},
        "frequency": {n: _mean_rows(p) for n, p in gates.items()},
    }
    for k, task in enumerate(calib.task_names):  # reads tags: each task's own merge
        plans[f"merge:{task}"] = {n: _mean_rows(p[calib.tasks == k]) for n, p in gates.items()}
    table = {name: _scores(backend, plan, test, metric) for name, plan in plans.items()}
    tasks = list(test.task_names)
    own = [table[f"merge:{t}"][i] for i, t in enumerate(tasks)]
    report: dict[str, Any] = {
        "metric": metric.name,
        "tasks": {
            t: {
                "full_moe": table["full_moe"][i],
                "uniform": table["uniform"][i],
                "frequency": table["frequency"][i],
                "own_merge": own[i],
            }
            for i, t in enumerate(tasks)
        },
        "cross_merge": {t: dict(zip(tasks, table[f"merge:{t}"], strict=True)) for t in tasks},
        "latency": _latency(backend, plans["uniform"], test, settings),
    }
    report["mean"] = {
        m: float(np.mean([row[m] for row in report["tasks"].values()]))
        for m in ("full_moe", "uniform", "frequency", "own_merge")
    }
    backend.restore()
    return report


def _scores(backend: Backend, plan: Plan | None, pool: Pool, metric: Any) -> list[float]:
    if plan is None:
        backend.restore()
    else:
        backend.merge(plan)
    requests = Requests(pool.texts, pool.rows)
    predictions = backend.predict(requests).predictions
    scores = metric.score(backend, requests, predictions, pool_truth(pool))
    return [float(v) for v in per_task_mean(scores, pool)]


def _latency(
    backend: Backend, plan: Plan | None, pool: Pool, settings: BackendEval
) -> dict[str, float]:
    """Median end-to-end time of one batch of live texts, merged and full, paired by repeat."""
    texts = Requests(pool.texts[: settings.batch_size])  # no rows: tokenised end to end
    times: Mapping[str, list[float]] = {"merged": [], "full": []}
    for _ in range(settings.repeats):
        for name in ("merged", "full"):
            if name == "full":
                backend.restore()
            else:
                assert plan is not None
                backend.merge(plan)
            t0 = time.perf_counter()
            backend.predict(texts)
            times[name].append((time.perf_counter() - t0) * 1e3)
    merged, full = np.asarray(times["merged"]), np.asarray(times["full"])
    return {
        "batch_size": float(len(texts)),
        "merged_ms": float(np.median(merged)),
        "full_ms": float(np.median(full)),
        "paired_ratio": float(np.median(merged / full)),
    }
