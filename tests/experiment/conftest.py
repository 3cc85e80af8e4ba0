"""A numpy stand-in for the served model, so the loop and the runner are tested in
milliseconds; the real default model is exercised end to end in test_cli.py."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import pytest

from tanbr.backend.protocol import Prediction
from tanbr.backend.requests import Pool, Requests

N_TASKS = 4
TASKS = tuple(f"task{k}" for k in range(N_TASKS))
BLOCKS = {"layers.0.mlp": N_TASKS, "layers.1.mlp": N_TASKS}


class FakeBackend:
    """Expert k is task k's specialist: a request of task t is answered correctly iff its
    fixed uniform draw is below ``0.25 + 0.7 * c[t]`` (block 0's coeff of its expert); the full
    MoE and the soft merge route it to its own expert. Signatures are noisy task indicators
    (what a gate signature looks like); texts carry no tag."""

    kind = "classifier"
    signature = "fake"
    checkpoint = None  # nothing for a fresh serving process to load: no memory probes
    signature_cost = 0.0

    def __init__(self, tasks: np.ndarray, labels: np.ndarray, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.tasks = np.asarray(tasks)
        self.row_labels = np.asarray(labels)
        self.u = rng.uniform(size=len(tasks))
        self.sig = np.eye(N_TASKS)[self.tasks] + 0.2 * rng.standard_normal((len(tasks), N_TASKS))
        self.state: tuple[str, Mapping[str, np.ndarray] | None] = ("full", None)
        self.calls: list[str] = []

    @property
    def blocks(self) -> Mapping[str, int]:
        return BLOCKS

    @property
    def n_labels(self) -> int:
        return 2 * N_TASKS

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"{t}:{y}" for t in TASKS for y in (0, 1))

    def replica(self, *, experts: bool = True) -> FakeBackend:
        import copy

        return copy.copy(self)

    def _rows(self, requests: Requests) -> np.ndarray:
        if requests.rows is None:  # live texts: "row <i>"
            return np.array([int(t.split()[-1]) for t in requests.texts])
        return requests.rows

    def signatures(self, requests: Requests) -> np.ndarray:
        return self.sig[self._rows(requests)]

    def features(self, requests: Requests, kind: str) -> np.ndarray:
        return self.signatures(requests)

    def gate_probs(self, requests: Requests) -> dict[str, np.ndarray]:
        rows = self._rows(requests)
        p = 0.1 / (N_TASKS - 1) * np.ones((len(rows), N_TASKS))
        p[np.arange(len(rows)), self.tasks[rows]] = 0.9
        return {name: p for name in BLOCKS}

    def merge(self, plan: Mapping[str, np.ndarray]) -> float:
        self.calls.append("merge")
        self.state = ("merge", plan)
        return 0.5

    def merge_soft(self) -> float:
        self.state = ("soft", None)
        return 0.0

    def restore(self, *, streamed: bool = False) -> float:
        self.state = ("full", None)
        return 0.0

    def idle(self) -> None:
        pass

    def predict(self, requests: Requests) -> Prediction:
        t0 = time.perf_counter()
        rows = self._rows(requests)
        kind, plan = self.state
        if kind == "merge":
            assert plan is not None
            c = np.asarray(plan["layers.0.mlp"])[self.tasks[rows]]
            ok = self.u[rows] < 0.25 + 0.7 * c
        else:
            ok = self.u[rows] < 0.93
        pred = np.where(ok, self.row_labels[rows], (self.row_labels[rows] + 1) % self.n_labels)
        probs = np.full((len(rows), self.n_labels), 0.01)
        probs[np.arange(len(rows)), pred] = 1.0
        return Prediction(probs / probs.sum(1, keepdims=True), (time.perf_counter() - t0) * 1e3)

    def reference(self, requests: Requests) -> np.ndarray:
        rows = self._rows(requests)
        ok = self.u[rows] < 0.93
        return np.where(ok, self.row_labels[rows], (self.row_labels[rows] + 1) % self.n_labels)

    def memory_bytes(self) -> int:
        return 100 if self.state[0] != "merge" else 40


def make_pool(rng: np.random.Generator, n_per_task: int, offset: int) -> Pool:
    tasks = np.repeat(np.arange(N_TASKS), n_per_task)
    labels = 2 * tasks + rng.integers(0, 2, len(tasks))
    rows = np.arange(len(tasks)) + offset
    return Pool(tuple(f"row {r}" for r in rows), tasks, labels, TASKS, rows=rows)


@pytest.fixture
def fake() -> tuple[FakeBackend, Pool, Pool]:
    rng = np.random.default_rng(0)
    calib = make_pool(rng, 100, 0)
    test = make_pool(rng, 100, len(calib.texts))
    tasks = np.concatenate([calib.tasks, test.tasks])
    labels = np.concatenate([calib.labels, test.labels])
    return FakeBackend(tasks, labels), calib, test
