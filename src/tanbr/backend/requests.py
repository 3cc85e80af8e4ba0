"""What a backend serves and what a slot is made of: unlabeled requests, and the hidden truth
kept apart from them; a pool of labelled requests to draw slots from.

The split between :class:`Requests` and :class:`Truth` is the guarantee that no policy or
estimator ever sees a task tag: everything the system decides from is built from ``Requests``
alone, and ``Truth`` is read only by the reward, the oracles and the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Requests:
    """A batch of unlabeled requests: texts only, never a task tag or a label.

    ``rows`` optionally indexes a backend's cache of precomputed lower-layer states (the
    experiment caches the test split once); live traffic leaves it ``None`` and the backend
    encodes the texts.
    """

    texts: tuple[str, ...]
    rows: np.ndarray | None = None  # (n,) int64, or None

    def __post_init__(self) -> None:
        if not isinstance(self.texts, tuple):
            object.__setattr__(self, "texts", tuple(self.texts))
        for i, text in enumerate(self.texts):
            if not isinstance(text, str):
                raise ValueError(f"requests: text {i} is {type(text).__name__}, not str")
        if self.rows is not None:
            rows = np.asarray(self.rows)
            if rows.ndim != 1 or rows.shape[0] != len(self.texts):
                raise ValueError(
                    f"requests: rows must have shape ({len(self.texts)},), got {rows.shape}"
                )
            if rows.size and (not np.issubdtype(rows.dtype, np.integer) or rows.min() < 0):
                raise ValueError("requests: rows must be non-negative integers")
            object.__setattr__(self, "rows", rows.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: np.ndarray | Sequence[int] | slice) -> Requests:
        """A sub-batch (e.g. the head of a slot, or one task's requests for the task oracle)."""
        idx = np.arange(len(self.texts))[index]
        rows = None if self.rows is None else self.rows[idx]
        return Requests(tuple(self.texts[i] for i in idx), rows)


@dataclass(frozen=True, eq=False)
class Truth:
    """The hidden side of a slot: each request's task and true label, and the true mix.

    ``mix`` is the slot's empirical task composition over ``task_names`` (what the slot's
    accuracy depends on); ``labels`` index the model's joint label space (-1 for a language
    model's requests). ``targets``: a language model's reference continuation of each request
    (None where a request has none), or None when the task has no targets at all.
    """

    tasks: tuple[int, ...]  # task index per request, into task_names
    labels: np.ndarray  # (n,) int64 joint label index per request
    task_names: tuple[str, ...]
    targets: tuple[str | None, ...] | None = None
    mix: np.ndarray = field(init=False)  # (n_tasks,)

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        if labels.shape != (len(self.tasks),):
            raise ValueError(f"truth: labels shape {labels.shape} != ({len(self.tasks)},)")
        if self.targets is not None:
            object.__setattr__(self, "targets", _check_targets("truth", self.targets, len(labels)))
        n_tasks = len(self.task_names)
        tasks = np.asarray(self.tasks, dtype=np.int64)
        if tasks.size and (tasks.min() < 0 or tasks.max() >= n_tasks):
            raise ValueError(f"truth: task index out of range 0..{n_tasks - 1}")
        counts = np.bincount(tasks, minlength=n_tasks).astype(np.float64)
        mix = counts / max(1, len(self.tasks))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "mix", mix)

    def take(self, index: np.ndarray | Sequence[int] | slice) -> Truth:
        idx = np.arange(len(self.tasks))[index]
        targets = None if self.targets is None else tuple(self.targets[i] for i in idx)
        return Truth(tuple(self.tasks[i] for i in idx), self.labels[idx], self.task_names, targets)


@dataclass(frozen=True, eq=False)
class Slot:
    """One time slot of the stream: its index, the requests, and (offline only) the truth."""

    index: int
    requests: Requests
    truth: Truth | None = None

    def __post_init__(self) -> None:
        if self.truth is not None and len(self.truth.tasks) != len(self.requests):
            raise ValueError(
                f"slot {self.index}: {len(self.requests)} requests but "
                f"{len(self.truth.tasks)} truth rows"
            )


@dataclass(frozen=True, eq=False)
class Pool:
    """Labelled requests to draw slots from (e.g. the test split).

    ``rows`` index the backend's cache of lower states (None: texts are encoded live);
    ``targets``: reference continuations of a language model's requests (passed into the
    slots' truth), None for a classifier's pool.
    """

    texts: tuple[str, ...]
    tasks: np.ndarray  # (n,) int64 task index
    labels: np.ndarray  # (n,) int64 joint label index
    task_names: tuple[str, ...]
    rows: np.ndarray | None = None
    targets: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.texts)
        tasks = np.asarray(self.tasks, dtype=np.int64)
        labels = np.asarray(self.labels, dtype=np.int64)
        if tasks.shape != (n,) or labels.shape != (n,):
            raise ValueError(f"pool: tasks {tasks.shape} and labels {labels.shape} must be ({n},)")
        if self.targets is not None:
            object.__setattr__(self, "targets", _check_targets("pool", self.targets, n))
        if n and (tasks.min() < 0 or tasks.max() >= len(self.task_names)):
            raise ValueError("pool: task index out of range")
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "labels", labels)
        self.by_task  # noqa: B018  (validates that every task has requests)

    @property
    def by_task(self) -> list[np.ndarray]:
        groups = [np.flatnonzero(self.tasks == k) for k in range(len(self.task_names))]
        empty = [self.task_names[k] for k, g in enumerate(groups) if len(g) == 0]
        if empty:
            raise ValueError(f"pool has no request of task(s) {empty}")
        return groups

    def slot(self, index: int, idx: np.ndarray) -> Slot:
        """The slot made of pool entries ``idx`` (truth attached, kept apart)."""
        rows = None if self.rows is None else np.asarray(self.rows)[idx]
        requests = Requests(tuple(self.texts[i] for i in idx), rows)
        targets = None if self.targets is None else tuple(self.targets[i] for i in idx)
        tasks = tuple(int(t) for t in self.tasks[idx])
        truth = Truth(tasks, self.labels[idx], self.task_names, targets)
        return Slot(index, requests, truth)


def pool_truth(pool: Pool) -> Truth:
    """The truth of a whole pool (every request, in pool order)."""
    return pool.slot(0, np.arange(len(pool.texts))).truth  # type: ignore[return-value]


def _check_targets(owner: str, targets: Sequence[str | None], n: int) -> tuple[str | None, ...]:
    """Targets as a tuple of n strings or None, or a ValueError naming the bad entry."""
    out = tuple(targets)
    if len(out) != n:
        raise ValueError(f"{owner}: {len(out)} targets for {n} requests")
    for i, target in enumerate(out):
        if target is not None and not isinstance(target, str):
            raise ValueError(f"{owner}: target {i} is {type(target).__name__}, not str or None")
    return out
