"""Workloads: task-mix schedules, request pools and slot streams, and trace replay.

A schedule is a (n_slots, n_tasks) matrix of generating mixes. A slot of size n draws its
task composition from the slot's mix (multinomial), then draws each request from that task's
pool (the test split), so the slot's true mix (its empirical composition) fluctuates around
the schedule as real traffic does. Policies of one seed all see the same stream.

Schedules (``SCHEDULES``): ``stationary``, ``switch`` (abrupt changes of the dominant tasks),
``periodic`` (smooth cycling), ``random-walk`` (Dirichlet random walk) and ``drift`` (the demo:
a few tasks dominate each slot and the dominant ones change over time with a short ramp).
``trace`` replays per-slot mixes from a CSV or JSONL file; :func:`read_request_trace` replays
requests.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tanbr.backend.requests import Pool, Requests, Slot

# --- schedules ----------------------------------------------------------------------------------


def _check(n_slots: int, n_tasks: int) -> None:
    if n_slots < 1:
        raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")


def stationary(
    *, n_slots: int, n_tasks: int, rng: np.random.Generator, mix: Sequence[float] | None = None
) -> np.ndarray:
    """The same mix every slot (uniform unless given)."""
    _check(n_slots, n_tasks)
    p = np.full(n_tasks, 1.0 / n_tasks) if mix is None else np.asarray(mix, dtype=float)
    if p.shape != (n_tasks,) or (p < 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"workload.mix must be {n_tasks} non-negative weights summing to 1")
    return np.tile(p, (n_slots, 1))


def _dominant_mix(
    tasks: np.ndarray, n_tasks: int, dominance: float, rng: np.random.Generator
) -> np.ndarray:
    """``dominance`` of the mass on ``tasks`` (random split), the rest spread over all tasks."""
    p = np.full(n_tasks, (1.0 - dominance) / n_tasks)
    p[tasks] += dominance * rng.dirichlet(np.full(len(tasks), 4.0))
    return p


def drift(
    *,
    n_slots: int,
    n_tasks: int,
    rng: np.random.Generator,
    n_dominant: int = 2,
    dominance: float = 0.85,
    period: int = 25,
    ramp: int = 5,
    jitter: float = 200.0,
) -> np.ndarray:
    """A few tasks dominate each slot and the dominant set changes over time.

    Every ``period`` slots (randomised by +-40%) a new set of ``n_dominant`` tasks (different
    from the current one) takes ``dominance`` of the mass, with weights drawn from
    Dirichlet(4); the change blends in linearly over ``ramp`` slots. Each slot's mix is then
    jittered: Dirichlet(jitter * mix).
    """
    _check(n_slots, n_tasks)
    if not 1 <= n_dominant <= n_tasks:
        raise ValueError(f"workload.n_dominant must be in 1..{n_tasks}, got {n_dominant}")
    if not 0.0 <= dominance <= 1.0:
        raise ValueError(f"workload.dominance must be in [0, 1], got {dominance}")
    if period < 1 or ramp < 0:
        raise ValueError(f"workload.period must be >= 1 and ramp >= 0, got {period}, {ramp}")
    out = np.zeros((n_slots, n_tasks))
    current = rng.choice(n_tasks, size=n_dominant, replace=False)
    base = _dominant_mix(current, n_tasks, dominance, rng)
    prev = base
    t = 0
    since = ramp  # no ramp before the first segment
    next_change = max(1, round(period * rng.uniform(0.6, 1.4)))
    while t < n_slots:
        if t == next_change:
            others = np.setdiff1d(np.arange(n_tasks), current)
            pick = others if len(others) >= n_dominant else np.arange(n_tasks)
            current = rng.choice(pick, size=n_dominant, replace=False)
            prev, base = out[t - 1].copy(), _dominant_mix(current, n_tasks, dominance, rng)
            since = 0
            next_change = t + max(1, round(period * rng.uniform(0.6, 1.4)))
        w = 1.0 if ramp == 0 else min(1.0, (since + 1) / (ramp + 1))
        out[t] = (1 - w) * prev + w * base
        since += 1
        t += 1
    if jitter > 0:
        out = np.vstack([rng.dirichlet(jitter * p + 1e-3) for p in out])
    return out


def switch(
    *,
    n_slots: int,
    n_tasks: int,
    rng: np.random.Generator,
    n_dominant: int = 2,
    dominance: float = 0.85,
    period: int = 25,
) -> np.ndarray:
    """Abrupt switches: ``drift`` without ramps or jitter, changes every ``period`` slots."""
    _check(n_slots, n_tasks)
    out = np.zeros((n_slots, n_tasks))
    current: np.ndarray = np.array([], dtype=np.int64)
    for start in range(0, n_slots, period):
        others = np.setdiff1d(np.arange(n_tasks), current)
        pick = others if len(others) >= n_dominant else np.arange(n_tasks)
        current = rng.choice(pick, size=min(n_dominant, n_tasks), replace=False)
        out[start : start + period] = _dominant_mix(current, n_tasks, dominance, rng)
    return out


def periodic(
    *,
    n_slots: int,
    n_tasks: int,
    rng: np.random.Generator,
    period: int = 50,
    sharpness: float = 3.0,
) -> np.ndarray:
    """Smooth cycling: task k peaks at phase k / n_tasks of each period (softmax of cosines)."""
    _check(n_slots, n_tasks)
    t = np.arange(n_slots)[:, None]  # (T, 1)
    phase = np.arange(n_tasks)[None, :] / n_tasks  # (1, K)
    logits = sharpness * np.cos(2 * np.pi * (t / period - phase))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return np.asarray(p / p.sum(1, keepdims=True))


def random_walk(
    *, n_slots: int, n_tasks: int, rng: np.random.Generator, concentration: float = 50.0
) -> np.ndarray:
    """Dirichlet random walk: p_{t+1} ~ Dirichlet(concentration * p_t + 0.05)."""
    _check(n_slots, n_tasks)
    out = np.zeros((n_slots, n_tasks))
    p = rng.dirichlet(np.ones(n_tasks))
    for t in range(n_slots):
        out[t] = p
        p = rng.dirichlet(concentration * p + 0.05)
    return out


def read_mix_trace(path: str | Path, task_names: Sequence[str]) -> np.ndarray:
    """Per-slot mixes from a CSV (a header of task names, one row per slot) or JSONL file
    (one object ``{task: weight}`` or ``{"mix": {...}}`` per line). Rows are normalised;
    missing tasks count 0; unknown task names, negative or all-zero rows raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.DictReader(f), 2):
                rows.append((lineno, {k: v for k, v in row.items() if k not in ("slot", None)}))
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not JSON: {err.msg}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected an object of task weights")
                obj = obj.get("mix", obj)
                rows.append((lineno, {k: v for k, v in obj.items() if k != "slot"}))
    if not rows:
        raise ValueError(f"{path}: the trace has no slots")
    index = {name: k for k, name in enumerate(task_names)}
    out = np.zeros((len(rows), len(task_names)))
    for t, (lineno, row) in enumerate(rows):
        for name, value in row.items():
            if name not in index:
                raise ValueError(
                    f"{path}:{lineno}: unknown task {name!r} (known: {list(task_names)})"
                )
            try:
                w = float(value) if value not in ("", None) else 0.0
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{lineno}: weight of {name!r} is not a number: {value!r}"
                ) from None
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"{path}:{lineno}: weight of {name!r} must be >= 0, got {value!r}")
            out[t, index[name]] = w
        if out[t].sum() <= 0:
            raise ValueError(f"{path}:{lineno}: all task weights are zero")
        out[t] /= out[t].sum()
    return out


def introduce_task(mixes: np.ndarray, task: int, *, at: int, share: float) -> np.ndarray:
    """A task absent before slot ``at`` (its mass spread over the others) that then takes
    ``share`` of every slot (0: the schedule's own share): a task never seen in calibration
    arriving mid-stream."""
    mixes = np.array(mixes, dtype=float)
    if not 0 <= task < mixes.shape[1]:
        raise ValueError(f"new task index must be in 0..{mixes.shape[1] - 1}, got {task}")
    if not 0.0 <= share < 1.0 or at < 0:
        raise ValueError(f"workload.new_task_share must be in [0, 1) and at >= 0, got {share}")
    before = mixes[:at]
    before[:, task] = 0.0
    mixes[:at] = before / before.sum(1, keepdims=True)
    if share > 0:
        after = mixes[at:]
        after[:, task] = 0.0
        after *= (1.0 - share) / after.sum(1, keepdims=True)
        after[:, task] = share
        mixes[at:] = after
    return mixes


Schedule = Callable[..., np.ndarray]

SCHEDULES: dict[str, Schedule] = {
    "stationary": stationary,
    "switch": switch,
    "periodic": periodic,
    "random-walk": random_walk,
    "drift": drift,
}


# --- slots --------------------------------------------------------------------------------------


def draw_slots(
    pool: Pool, mixes: np.ndarray, *, slot_size: int, rng: np.random.Generator
) -> list[Slot]:
    """One slot per row of ``mixes``: composition ~ Multinomial(slot_size, mix), requests
    drawn uniformly (without replacement within a slot) from each task's pool."""
    if slot_size < 1:
        raise ValueError(f"workload.slot_size must be >= 1, got {slot_size}")
    mixes = np.asarray(mixes, dtype=float)
    if mixes.ndim != 2 or mixes.shape[1] != len(pool.task_names):
        raise ValueError(f"mixes must be (n_slots, {len(pool.task_names)}), got {mixes.shape}")
    groups = pool.by_task
    slots = []
    for t, mix in enumerate(mixes):
        counts = rng.multinomial(slot_size, mix / mix.sum())
        idx = np.concatenate(
            [rng.choice(g, size=c, replace=c > len(g)) for g, c in zip(groups, counts, strict=True)]
        )
        rng.shuffle(idx)  # arrival order: tasks interleaved
        slots.append(pool.slot(t, idx))
    return slots


def read_request_trace(path: str | Path, pool: Pool) -> list[Slot]:
    """Replay requests: CSV or JSONL rows with ``slot`` and ``text`` (an optional ``task`` is
    checked against the pool's task names). A slot whose texts are all in the pool reuses the
    pool's cached rows and truth; a slot with other texts is served live, without truth (it
    is not scored). Slots are numbered in order of first appearance."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    records: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            records = list(enumerate(csv.DictReader(f), 2))
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not JSON: {err.msg}") from None
    by_text = {text: i for i, text in enumerate(pool.texts)}
    task_index = {name: k for k, name in enumerate(pool.task_names)}
    slots: dict[str, list[tuple[int, str, int | None]]] = {}
    for lineno, rec in records:
        if not isinstance(rec, dict) or "slot" not in rec or "text" not in rec:
            raise ValueError(f"{path}:{lineno}: each row needs 'slot' and 'text'")
        text = rec["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{lineno}: 'text' must be a non-empty string")
        task = rec.get("task")
        if task not in (None, "") and task not in task_index:
            raise ValueError(f"{path}:{lineno}: unknown task {task!r}")
        slots.setdefault(str(rec["slot"]), []).append((lineno, text, by_text.get(text)))
    if not slots:
        raise ValueError(f"{path}: the trace has no requests")
    out = []
    for t, items in enumerate(slots.values()):
        known = [i for _, _, i in items if i is not None]
        if len(known) == len(items):
            out.append(pool.slot(t, np.asarray(known, dtype=np.int64)))
        else:  # unknown texts: served live, no truth
            out.append(Slot(t, Requests(tuple(text for _, text, _ in items))))
    return out
