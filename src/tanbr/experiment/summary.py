"""Summaries of a run: per-policy headline figures (mean over seeds) and the public JSON."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tanbr.experiment.runner import PolicyRun


def _pct(values: Iterable[float], q: float) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


def summarize(runs: Sequence[PolicyRun]) -> dict[str, Any]:
    """Per policy (mean over seeds): accuracy, final cumulative regret, latency, memory, merge.

    ``latency_p50_ms``/``latency_p95_ms`` are end-to-end (tokenize + encoder + MoE layers +
    head) and ``moe_latency_*`` the MoE layers + head alone (cached lower states), both per
    probe batch of ``latency.batch_size`` requests.
    """
    by_policy: dict[str, list[PolicyRun]] = {}
    for run in runs:
        by_policy.setdefault(run.policy, []).append(run)
    policies: dict[str, dict[str, Any]] = {}
    detail: dict[str, dict[str, Any]] = {}
    tvs: list[float] = []
    for name, group in by_policy.items():
        accs, regrets = [], []
        for run in group:
            acc = [r.accuracy for r in run.records if r.accuracy is not None]
            reg = [r.regret for r in run.records if r.regret is not None]
            accs.append(float(np.mean(acc)) if acc else float("nan"))
            regrets.append(float(np.sum(reg)) if reg else float("nan"))
        records = [r for run in group for r in run.records]
        e2e = [ms for run in group for ms in run.e2e_ms]
        policies[name] = {
            "accuracy": float(np.mean(accs)),
            "regret": float(np.mean(regrets)),
            "latency_p50_ms": _pct(e2e, 50),
            "latency_p95_ms": _pct(e2e, 95),
            "memory_bytes": int(np.median([r.memory_bytes for r in records])),
            "merge_ms": float(np.mean([r.merge_ms for r in records])),
        }
        detail[name] = {
            "accuracy_std": float(np.std(accs)),
            "regret_std": float(np.std(regrets)),
            "moe_latency_p50_ms": _pct((ms for run in group for ms in run.moe_ms), 50),
            "moe_latency_p95_ms": _pct((ms for run in group for ms in run.moe_ms), 95),
            "select_ms_p50": _pct((r.select_ms for r in records), 50),
            "update_ms_p50": _pct((r.update_ms for r in records), 50),
            "oracle_accuracy": float(
                np.mean([r.oracle_accuracy for r in records if r.oracle_accuracy is not None])
            )
            if any(r.oracle_accuracy is not None for r in records)
            else None,
            "seconds": float(sum(run.seconds for run in group)),
            "seeds": [run.seed for run in group],
        }
        tvs += [r.tv for r in records if r.tv is not None]
    return {
        "policies": policies,
        "estimator_tv": float(np.mean(tvs)) if tvs else None,
        "detail": detail,
    }


def public_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Exactly the JSON of ``tanbr compare --json``: per-policy headline figures and the TV."""
    keys = ("accuracy", "regret", "latency_p50_ms", "latency_p95_ms", "memory_bytes", "merge_ms")
    return {
        "policies": {name: {k: row[k] for k in keys} for name, row in summary["policies"].items()},
        "estimator_tv": summary["estimator_tv"],
    }
