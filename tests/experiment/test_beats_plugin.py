"""In a world where merging by the estimated mix is wrong, the learning policies must beat it.

The world: every task's requests are answered well by the *next* task's expert (task k by
expert k + 1 mod K), while the gates (the profiles the plug-in merge is built from) say task k
uses expert k. Plug-in puts the weight where the gates point, the wrong experts; the slot
oracle shows how much better a merge for the same mix can be; a policy that learns from the
reward must find the rotated merge and beat plug-in after its warm-up.
"""

from __future__ import annotations

import numpy as np
import pytest

from tanbr.backend.protocol import Prediction
from tanbr.backend.requests import Pool, Requests
from tanbr.experiment.config import load_config
from tanbr.experiment.runner import make_slots, run_policy
from tanbr.experiment.setup import prepare

from .conftest import N_TASKS, FakeBackend

WARM_UP = 60


class RotatedBackend(FakeBackend):
    """Task k's requests are right iff their draw is below 0.2 + 0.75 * c[k + 1 mod K]."""

    def predict(self, requests: Requests) -> Prediction:
        kind, plan = self.state
        if kind != "merge":
            return super().predict(requests)
        assert plan is not None
        rows = self._rows(requests)
        helper = (self.tasks[rows] + 1) % N_TASKS
        ok = self.u[rows] < 0.2 + 0.75 * np.asarray(plan["layers.0.mlp"])[helper]
        pred = np.where(ok, self.row_labels[rows], (self.row_labels[rows] + 1) % self.n_labels)
        probs = np.full((len(rows), self.n_labels), 0.01)
        probs[np.arange(len(rows)), pred] = 1.0
        return Prediction(probs / probs.sum(1, keepdims=True), 0.0)


@pytest.fixture
def rotated(fake: tuple[FakeBackend, Pool, Pool]) -> tuple[RotatedBackend, Pool, Pool]:
    _, calib, test = fake
    tasks = np.concatenate([calib.tasks, test.tasks])
    labels = np.concatenate([calib.labels, test.labels])
    return RotatedBackend(tasks, labels), calib, test


@pytest.mark.parametrize("policy", ["tanbr", "tanbr-paper"])
def test_a_learning_policy_beats_plug_in_where_plug_in_is_wrong(
    rotated: tuple[RotatedBackend, Pool, Pool], policy: str
) -> None:
    backend, calib, test = rotated
    cfg = load_config(
        overrides=[
            "n_slots=200", "seeds=[0]", "workload.slot_size=64", "workload.period=25",
            "estimator.n_types=4", "estimator.head=16", "oracle.n_candidates=16",
            "latency.batches=1", "latency.batch_size=8", "evaluation.memory=false",
        ]
    )  # fmt: skip
    setup = prepare(cfg, backend, calib, test)
    slots = make_slots(setup, 0)
    acc: dict[str, float] = {}
    for name in (policy, "plug-in", "slot-oracle"):
        records = run_policy(setup, name, 0, slots, probe=False).records[WARM_UP:]
        acc[name] = float(np.mean([r.accuracy for r in records if r.accuracy is not None]))
    assert acc["slot-oracle"] > acc["plug-in"] + 0.1  # plug-in is wrong in this world
    assert acc[policy] > acc["plug-in"] + 0.05, acc  # and the learner finds what it misses
