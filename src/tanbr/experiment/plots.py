"""The run folder's PNG plots, drawn from ``trace.jsonl`` and ``summary.json`` alone.

Each function takes records (or the summary) and an optional matplotlib ``Axes`` and returns
the ``Axes``, so a notebook can compose them; :func:`plot_run` writes the standard set into a
run folder. matplotlib is imported here only, with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tanbr.experiment.records import SlotRecord, read_trace

# Reference rows drawn dashed so that the eye separates them from the contenders.
REFERENCE = ("slot-oracle", "task-oracle", "full-moe")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: Sequence[SlotRecord], attr: str) -> dict[str, np.ndarray]:
    """Per policy: (n_seeds, n_slots) array of ``attr`` (NaN where missing)."""
    grouped: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        value = getattr(r, attr)
        grouped[r.policy][r.seed][r.slot] = np.nan if value is None else float(value)
    out = {}
    for policy, seeds in grouped.items():
        n = max(max(s) for s in seeds.values()) + 1
        arr = np.full((len(seeds), n), np.nan)
        for i, slots in enumerate(seeds.values()):
            for t, v in slots.items():
                arr[i, t] = v
        out[policy] = arr
    return out


def _style(policy: str) -> dict[str, Any]:
    if policy == "tanbr":
        return {"linewidth": 2.4, "color": "black", "zorder": 5}
    if policy in REFERENCE:
        return {"linestyle": "--", "linewidth": 1.4}
    return {"linewidth": 1.0, "alpha": 0.85}


def plot_cumulative_regret(records: Sequence[SlotRecord], ax: Any = None) -> Any:
    """Cumulative regret against the slot oracle (mean over seeds; band = min..max)."""
    plt = _plt()
    ax = ax or plt.subplots(figsize=(9, 5.5))[1]
    for policy, arr in sorted(_series(records, "regret").items()):
        cum = np.nancumsum(arr, axis=1)  # (seeds, T)
        t = np.arange(1, cum.shape[1] + 1)
        (line,) = ax.plot(t, cum.mean(0), label=policy, **_style(policy))
        if cum.shape[0] > 1:
            ax.fill_between(t, cum.min(0), cum.max(0), color=line.get_color(), alpha=0.12)
    ax.set_title("Cumulative regret against the slot oracle (lower is better)")
    ax.set_xlabel("slot")
    ax.set_ylabel("cumulative regret (sum over slots of accuracy lost, 0-1 scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    return ax


def plot_accuracy(records: Sequence[SlotRecord], ax: Any = None, window: int = 10) -> Any:
    """Slot accuracy over time (rolling mean over ``window`` slots, mean over seeds)."""
    plt = _plt()
    ax = ax or plt.subplots(figsize=(9, 5.5))[1]
    kernel = np.ones(window) / window
    for policy, arr in sorted(_series(records, "accuracy").items()):
        mean = np.nanmean(arr, axis=0)
        smooth = np.convolve(mean, kernel, mode="valid") if len(mean) >= window else mean
        t = np.arange(len(smooth)) + (len(mean) - len(smooth)) + 1
        ax.plot(t, smooth, label=policy, **_style(policy))
    oracle = _series(records, "oracle_accuracy")
    if oracle:
        mean = np.nanmean(next(iter(oracle.values())), axis=0)
        if len(mean) >= window:
            mean = np.convolve(mean, kernel, mode="valid")
        ax.plot(
            np.arange(len(mean)) + window,
            mean,
            color="grey",
            linestyle=":",
            label="slot-oracle (expected)",
        )
    ax.set_title(f"Accuracy per slot (rolling mean over {window} slots)")
    ax.set_xlabel("slot")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    return ax


def plot_mix(records: Sequence[SlotRecord], tasks: Sequence[str], axes: Any = None) -> Any:
    """True vs estimated task mix over the slots of one run (first seed)."""
    plt = _plt()
    chosen = [r for r in records if r.est_mix_tasks is not None and r.true_mix is not None]
    if not chosen:
        raise ValueError("no slot has both a true and an estimated mix")
    policy, seed = chosen[0].policy, chosen[0].seed
    rows = sorted(
        (r for r in chosen if r.policy == policy and r.seed == seed), key=lambda r: r.slot
    )
    true = np.array([r.true_mix for r in rows])  # (T, n_tasks)
    est = np.array([r.est_mix_tasks for r in rows])  # (T, n_tasks)
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    t = np.array([r.slot for r in rows])
    labels = (
        list(tasks) if len(tasks) == true.shape[1] else [f"task {k}" for k in range(true.shape[1])]
    )
    axes[0].stackplot(t, true.T, labels=labels, alpha=0.9)
    axes[0].set_title("True task mix of each slot")
    axes[1].stackplot(t, est.T, labels=labels, alpha=0.9)
    tv = np.mean([r.tv for r in rows if r.tv is not None])
    axes[1].set_title(f"Estimated mix, label-free (task types matched to tasks); mean TV {tv:.3f}")
    for ax in axes:
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1)
        ax.margins(x=0)
    axes[1].set_xlabel("slot")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return axes


def plot_coeffs(records: Sequence[SlotRecord], policy: str = "tanbr", axes: Any = None) -> Any:
    """The chosen action (task-type weights) and the first block's coeffs over the slots."""
    plt = _plt()
    rows = sorted(
        (r for r in records if r.policy == policy and r.action is not None),
        key=lambda r: (r.seed, r.slot),
    )
    if not rows:
        raise ValueError(f"no action recorded for policy {policy!r}")
    seed = rows[0].seed
    rows = [r for r in rows if r.seed == seed]
    actions = np.array([r.action for r in rows])  # (T, K)
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    extent = (rows[0].slot - 0.5, rows[-1].slot + 0.5, -0.5, actions.shape[1] - 0.5)
    im = axes[0].imshow(
        actions.T, aspect="auto", origin="lower", extent=extent, vmin=0, vmax=1, cmap="viridis"
    )
    axes[0].set_title(f"{policy}: chosen action (weight of each task type), seed {seed}")
    axes[0].set_ylabel("task type")
    plt.colorbar(im, ax=axes[0], label="weight")
    first = rows[0].coeffs
    if first:
        block = next(iter(first))
        # (T, E): a grouped merge's rows have disjoint supports, so their sum gives each
        # expert its weight inside its own group
        coeffs = np.array([np.atleast_2d(r.coeffs[block]).sum(0) for r in rows if r.coeffs])
        im2 = axes[1].imshow(
            coeffs.T,
            aspect="auto",
            origin="lower",
            extent=(extent[0], extent[1], -0.5, coeffs.shape[1] - 0.5),
            vmin=0,
            vmax=1,
            cmap="magma",
        )
        axes[1].set_title(f"merge coefficients of block {block}")
        axes[1].set_ylabel("expert")
        plt.colorbar(im2, ax=axes[1], label="coefficient")
    axes[1].set_xlabel("slot")
    return axes


def plot_costs(summary: dict[str, Any], axes: Any = None) -> Any:
    """Latency p50 per batch (the whole served path, the served batch alone, the MoE layers)
    and memory per policy (the measured model share of a serving process's resident set beside
    the parameter bytes)."""
    plt = _plt()
    policies = summary["policies"]
    detail = summary.get("detail", {})
    names = sorted(policies, key=lambda n: (n != "full-moe", n))
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    y = np.arange(len(names))
    whole = [policies[n].get("latency_p50_ms") or 0.0 for n in names]
    served = [detail.get(n, {}).get("serve_p50_ms") or 0.0 for n in names]
    moe = [policies[n].get("moe_latency_p50_ms") or 0.0 for n in names]
    axes[0].barh(y - 0.27, whole, height=0.27, label="whole served path")
    axes[0].barh(y, served, height=0.27, label="served batch (tokenize to head)")
    axes[0].barh(y + 0.27, moe, height=0.27, label="MoE layers + head")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("latency p50 per batch (ms)")
    axes[0].set_title("Latency per policy")
    axes[0].legend(fontsize=8, loc="lower right")
    measured = [(policies[n].get("model_rss_bytes") or 0) / 2**20 for n in names]
    params = [(policies[n].get("param_bytes") or 0) / 2**20 for n in names]
    axes[1].barh(y - 0.2, measured, height=0.4, color="tab:green", label="model RSS (measured)")
    axes[1].barh(y + 0.2, params, height=0.4, color="tab:olive", label="parameter bytes")
    axes[1].set_yticks(y, names)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("MiB")
    axes[1].set_title("Memory per policy")
    axes[1].legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    return axes


def plot_run(folder: Path) -> list[Path]:
    """Write the standard plots of a run folder; returns the files written."""
    plt = _plt()
    records = list(read_trace(folder / "trace.jsonl"))
    summary = json.loads((folder / "summary.json").read_text())
    tasks = summary.get("tasks", [])
    written = []

    def save(fig: Any, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    plot_cumulative_regret(records, ax)
    save(fig, "regret.png")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    plot_accuracy(records, ax)
    save(fig, "accuracy.png")
    if any(r.est_mix_tasks is not None for r in records):
        fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
        plot_mix(records, tasks, axes)
        save(fig, "mix.png")
    bandit = [r.policy for r in records if r.action is not None and r.policy != "slot-oracle"]
    if bandit:
        policy = "tanbr" if "tanbr" in bandit else bandit[0]
        fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
        plot_coeffs(records, policy, axes)
        save(fig, "coeffs.png")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    plot_costs(summary, axes)
    save(fig, "costs.png")
    return written
