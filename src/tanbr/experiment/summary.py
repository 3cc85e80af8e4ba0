"""Summaries of a run: per-policy headline figures over seeds, and the public JSON.

Every figure is the system's own: the latency is the whole served path (the estimator's
signatures and estimate, the policy's decision and the merge, amortised over the slot, on top
of the served batch), the memory is measured in serving processes, and accuracy, regret and the
share of the slot oracle are on the requests each slot scored, with 95% intervals over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tanbr.experiment.memory import MemoryProbe, model_share
from tanbr.experiment.records import SlotRecord
from tanbr.experiment.values import PolicyRun

#: The keys of each policy in ``tanbr compare --json`` (and ``summary.json``'s ``policies``).
PUBLIC_KEYS = (
    "accuracy",
    "accuracy_ci95",
    "accuracy_tail",
    "accuracy_tail_ci95",
    "reward",
    "loss",
    "perplexity",
    "task_loss",
    "regret",
    "of_slot_oracle",
    "of_slot_oracle_ci95",
    "latency_p50_ms",
    "latency_p95_ms",
    "moe_latency_p50_ms",
    "estimator_ms_per_request",
    "rss_peak_bytes",
    "rss_steady_bytes",
    "model_rss_bytes",
    "param_bytes",
    "merge_ms",
)
#: Top-level keys of the public JSON.
PUBLIC_TOP = ("estimator_tv", "signature", "dtype", "wall_s")


@dataclass(frozen=True)
class Costs:
    """What the summary needs beyond the runs: the slot and probe sizes, the estimator's
    signature cost per request, and the memory probes by serving kind."""

    slot_size: int
    batch_size: int
    signature_ms: float = 0.0
    memory: Mapping[str, MemoryProbe] = field(default_factory=dict)
    tail: int = 0  # the last slots whose accuracy is reported apart (0: none)
    tasks: tuple[str, ...] = ()  # the true tasks, in the records' order (per-task figures)


def _pct(values: Iterable[float | None], q: float) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


def ci95(values: Sequence[float]) -> list[float] | None:
    """The 95% t-interval of the mean of per-seed values (None with fewer than two seeds)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    mean = float(arr.mean())
    return [mean - half, mean + half]


def batch_means_ci95(values: Sequence[float], n_batches: int = 20) -> list[float] | None:
    """The 95% interval of a series' mean from the means of ``n_batches`` contiguous batches
    (slots next to each other are correlated; batch means are close to independent)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size < 2 * n_batches:
        return None
    batches = [float(b.mean()) for b in np.array_split(arr, n_batches)]
    return ci95(batches)


def _accuracy_ci(per_seed: list[list[float]]) -> list[float] | None:
    """Over seeds when there are several; over slots (batch means) for one seed."""
    if len(per_seed) > 1:
        return ci95([float(np.mean(s)) for s in per_seed if s])
    return batch_means_ci95(per_seed[0]) if per_seed else None


def serving_kind(run: PolicyRun) -> str:
    """How a run served (the memory probe that stands for it): its most frequent slot kind,
    and for merges with m > 1 merged experts per block, ``merge-m<m>``."""
    kinds = [r.kind for r in run.records]
    if not kinds:
        return "merge"
    kind = max(set(kinds), key=kinds.count)
    if kind in ("full", "soft", "per-task"):
        return kind
    grouped = [  # a grouped plan's coefficients are (m, E): rows of rows
        len(c)
        for r in run.records
        for c in (r.coeffs or {}).values()
        if c and isinstance(c[0], list)
    ]
    rows = max(grouped, default=1)
    return "merge" if rows == 1 else f"merge-m{rows}"


def merge_per_slot(run: PolicyRun) -> float:
    """Merge time per slot, amortised: an in-place re-merge (median of the probes) in every
    slot whose plan differs from the previous slot's; per-task merges as recorded. A plan of
    merged weights records no coefficients: its action tells it apart (a static merge has
    none, and is merged once)."""
    if serving_kind(run) == "per-task":
        return float(np.mean([r.merge_ms for r in run.records])) if run.records else 0.0
    if not run.merge_probe_ms:
        return 0.0
    plans = [
        r.coeffs if r.coeffs is not None else r.action for r in run.records if r.kind == "merge"
    ]
    changes = sum(1 for a, b in zip([None, *plans], plans, strict=False) if a != b)
    return float(np.median(run.merge_probe_ms)) * changes / max(1, len(run.records))


def whole_path_ms(run: PolicyRun, costs: Costs) -> list[float]:
    """Per probe batch: the served batch end to end, plus the estimator's signatures of its
    requests (for policies that read the mix), plus its share of the slot's estimate, decision
    and merge (the batch's fraction of the slot)."""
    by_slot = {r.slot: r for r in run.records}
    per_slot_merge = merge_per_slot(run) if serving_kind(run) != "per-task" else 0.0
    share = costs.batch_size / max(1, costs.slot_size)
    out = []
    for decision, e2e in zip(run.probes, run.e2e_ms, strict=False):
        record = by_slot.get(decision.slot)
        per_slot = per_slot_merge
        extra = 0.0
        if record is not None:
            per_slot += record.select_ms
            if run.reads_mix:
                per_slot += record.estimate_ms
        if run.reads_mix:
            extra += costs.batch_size * costs.signature_ms
        out.append(e2e + extra + share * per_slot)
    return out


def loss_figures(records: Sequence[SlotRecord], tasks: Sequence[str]) -> dict[str, Any]:
    """A language model's figures: ``loss``, the mean over every scored request of its mean
    NLL per token of the true continuation (nats); ``perplexity``, its exp; ``task_loss``, the
    same loss per true task. All None when the records carry no loss (a classifier)."""
    scored = [r for r in records if r.loss is not None and r.n_served]
    if not scored:
        return {"loss": None, "perplexity": None, "task_loss": None}
    weights = np.asarray([r.n_served for r in scored], dtype=np.float64)
    loss = float(np.average([r.loss for r in scored], weights=weights))
    sums = np.zeros(len(tasks))
    counts = np.zeros(len(tasks))
    for r in scored:
        for t, (mean, n) in enumerate(zip(r.task_loss or (), r.task_n or (), strict=True)):
            if mean is not None and t < len(tasks):
                sums[t] += mean * n
                counts[t] += n
    task_loss = {
        name: float(sums[t] / counts[t]) if counts[t] else None for t, name in enumerate(tasks)
    }
    return {"loss": loss, "perplexity": math.exp(loss), "task_loss": task_loss}


def summarize(runs: Sequence[PolicyRun], costs: Costs) -> dict[str, Any]:
    """Per policy: accuracy and its share of the slot oracle (mean over seeds, 95% intervals),
    final cumulative regret, whole-path latency, measured and parameter memory, merge time."""
    by_policy: dict[str, list[PolicyRun]] = {}
    for run in runs:
        by_policy.setdefault(run.policy, []).append(run)
    policies: dict[str, dict[str, Any]] = {}
    detail: dict[str, dict[str, Any]] = {}
    tvs: list[float] = []
    for name, group in by_policy.items():
        accs, regrets, shares, rewards = [], [], [], []
        slot_accs: list[list[float]] = []
        tails: list[list[float]] = []
        for run in group:
            ordered = sorted(run.records, key=lambda r: r.slot)
            series = [r.accuracy for r in ordered if r.accuracy is not None]
            slot_accs.append(series)
            if costs.tail:
                tails.append(series[-costs.tail :])
            got = [r.reward for r in run.records if r.reward is not None]
            if got:
                rewards.append(float(np.mean(got)))
            acc = [r.accuracy for r in run.records if r.accuracy is not None]
            reg = [r.regret for r in run.records if r.regret is not None]
            paired = [
                (r.accuracy, r.oracle_accuracy)
                for r in run.records
                if r.accuracy is not None and r.oracle_accuracy is not None
            ]
            accs.append(float(np.mean(acc)) if acc else float("nan"))
            if reg:
                regrets.append(float(np.sum(reg)))
            if paired:
                mine, oracle = np.asarray(paired).mean(0)
                shares.append(float(mine / oracle) if oracle > 0 else float("nan"))
        records = [r for run in group for r in run.records]
        whole = [ms for run in group for ms in whole_path_ms(run, costs)]
        reads_mix = any(run.reads_mix for run in group)
        estimate = _pct((r.estimate_ms for r in records), 50) or 0.0
        profile = float(np.mean([r.profile_ms for r in records])) if records else 0.0
        per_slot = estimate + profile  # a new task type's profile passes, amortised
        estimator_ms = costs.signature_ms + per_slot / max(1, costs.slot_size) if reads_mix else 0.0
        kind = serving_kind(group[0])
        probe = costs.memory.get(kind)
        policies[name] = {
            "accuracy": _mean_or_none(a for a in accs if math.isfinite(a)),
            "accuracy_ci95": _accuracy_ci(slot_accs),
            "accuracy_tail": _mean_or_none(float(np.mean(t)) for t in tails if t),
            "accuracy_tail_ci95": _accuracy_ci(tails) if tails else None,
            "reward": float(np.mean(rewards)) if rewards else None,
            **loss_figures(records, costs.tasks),
            "regret": float(np.mean(regrets)) if regrets else None,
            "of_slot_oracle": float(np.mean(shares)) if shares else None,
            "of_slot_oracle_ci95": ci95(shares),
            "latency_p50_ms": _pct(whole, 50),
            "latency_p95_ms": _pct(whole, 95),
            "moe_latency_p50_ms": _pct((ms for run in group for ms in run.moe_ms), 50),
            "estimator_ms_per_request": estimator_ms,
            "rss_peak_bytes": probe.rss_peak_bytes if probe else None,
            "rss_steady_bytes": probe.rss_steady_bytes if probe else None,
            "model_rss_bytes": model_share(costs.memory, kind),
            "param_bytes": int(np.median([r.memory_bytes for r in records])),
            "merge_ms": float(np.mean([merge_per_slot(run) for run in group])),
        }
        e2e = [ms for run in group for ms in run.e2e_ms]
        detail[name] = {
            "accuracy_std": float(np.std(accs)),
            "regret_std": float(np.std(regrets)) if regrets else None,
            "serve_p50_ms": _pct(e2e, 50),
            "serve_p95_ms": _pct(e2e, 95),
            "latency_per_request_p50_ms": (
                None if not whole else float(np.median(whole)) / max(1, costs.batch_size)
            ),
            "moe_latency_p95_ms": _pct((ms for run in group for ms in run.moe_ms), 95),
            "merge_probe_ms_p50": _pct((ms for run in group for ms in run.merge_probe_ms), 50),
            "select_ms_p50": _pct((r.select_ms for r in records), 50),
            "estimate_ms_p50": _pct((r.estimate_ms for r in records), 50),
            "update_ms_p50": _pct((r.update_ms for r in records), 50),
            "oracle_accuracy": _mean_or_none(r.oracle_accuracy for r in records),
            "serving_kind": kind,
            "reads_mix": reads_mix,
            "seconds": float(sum(run.seconds for run in group)),
            "seeds": [run.seed for run in group],
            "per_seed_accuracy": accs,
        }
        tvs += [r.tv for r in records if r.tv is not None]
    return {
        "policies": policies,
        "estimator_tv": float(np.mean(tvs)) if tvs else None,
        "detail": detail,
        "memory": {kind: vars(p) for kind, p in costs.memory.items()},
        "signature_ms_per_request": costs.signature_ms,
    }


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    arr = [v for v in values if v is not None]
    return float(np.mean(arr)) if arr else None


def public_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Exactly the JSON of ``tanbr compare --json``: per-policy headline figures, the TV, the
    signature, the serving precision and the wall time."""
    return {
        "policies": {
            name: {k: row.get(k) for k in PUBLIC_KEYS} for name, row in summary["policies"].items()
        },
        **{k: summary.get(k) for k in PUBLIC_TOP},
    }
