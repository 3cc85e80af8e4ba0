"""Comparisons on Ray: the same records as the local executor, a dead worker retried, a
failing run reported and no partial run folder left behind."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tanbr.backend.requests import Pool
from tanbr.experiment.config import load_config
from tanbr.experiment.runner import execute
from tanbr.experiment.setup import prepare

from .conftest import FakeBackend, make_pool

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tanbr[ray]')")

from tanbr.experiment.ray_executor import RayExecutor  # noqa: E402


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray of 2 CPUs for the module. The fake backend and its factory travel by value:
    the test modules are not importable in Ray's workers."""
    from ray import cloudpickle

    modules = [sys.modules[FakeBackend.__module__], sys.modules[__name__]]
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


class FakeFactory:
    """Builds the same fake backend in any process (what BackendSpec does for a real model).

    ``fail``: every merge raises ValueError with this message; ``die``: the first merge in any
    process kills that process (once, marked by this file)."""

    def __init__(
        self, backend: FakeBackend, *, fail: str | None = None, die: Path | None = None
    ) -> None:
        self.tasks, self.labels = backend.tasks, backend.row_labels
        self.fail, self.die = fail, die

    def __call__(self) -> FakeBackend:
        backend = FakeBackend(self.tasks, self.labels)
        merge = backend.merge

        def merge_or_fail(plan: Any) -> float:
            if self.fail is not None:
                raise ValueError(self.fail)
            if self.die is not None and not self.die.exists():
                self.die.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return merge(plan)

        backend.merge = merge_or_fail  # type: ignore[method-assign]
        return backend


def _fake() -> tuple[FakeBackend, Pool, Pool]:
    rng = np.random.default_rng(0)
    calib = make_pool(rng, 100, 0)
    test = make_pool(rng, 100, len(calib.texts))
    tasks = np.concatenate([calib.tasks, test.tasks])
    labels = np.concatenate([calib.labels, test.labels])
    return FakeBackend(tasks, labels), calib, test


CONFIG = [
    "n_slots=8", "seeds=[0, 1]", "workload.slot_size=32", "workload.period=4",
    "estimator.n_types=4", "estimator.head=16", "oracle.n_candidates=8", "latency.batches=2",
    "latency.batch_size=8", "evaluation.memory=false",
    "policies=['tanbr', 'plug-in', 'uniform', 'egreedy-grid']",
]  # fmt: skip


def _strip(result: Any) -> list[tuple[Any, ...]]:
    return [
        (r.policy, r.seed, r.slot, r.action, r.accuracy, r.reward, r.regret, r.tv)
        for run in result.runs
        for r in run.records
    ]


def test_ray_gives_the_local_records_slot_for_slot(local_ray: None, tmp_path: Path) -> None:
    cfg = load_config(overrides=CONFIG)
    backend, calib, test = _fake()
    local = execute(prepare(cfg, backend, calib, test), out=tmp_path / "local", plots=False)
    backend, calib, test = _fake()
    executor = RayExecutor(backend_factory=FakeFactory(backend))
    on_ray = execute(
        prepare(cfg, backend, calib, test), out=tmp_path / "ray", plots=False, executor=executor
    )
    assert len(_strip(local)) == 8 * 2 * 5  # four policies and the slot oracle, two seeds
    assert _strip(on_ray) == _strip(local)
    for name, row in local.summary["policies"].items():
        for key in ("accuracy", "regret", "reward"):
            assert on_ray.summary["policies"][name][key] == row[key]


@pytest.mark.slow  # a worker process is started again after it dies (~1 min)
def test_a_dead_worker_is_retried_on_a_new_one(local_ray: None, tmp_path: Path) -> None:
    """The actor running the job is killed mid-run: the job runs again on a fresh actor, and
    the records are those of an undisturbed run."""
    cfg = load_config(overrides=[*CONFIG, "seeds=[0]", "policies=['tanbr']"])
    backend, calib, test = _fake()
    clean = execute(prepare(cfg, backend, calib, test), out=tmp_path / "clean", plots=False)
    marker = tmp_path / "died"
    backend, calib, test = _fake()
    executor = RayExecutor(backend_factory=FakeFactory(backend, die=marker), actors=1)
    retried = execute(
        prepare(cfg, backend, calib, test), out=tmp_path / "ray", plots=False, executor=executor
    )
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker did die
    assert _strip(retried) == _strip(clean)


@pytest.mark.slow  # a worker process is started again after it dies (~1 min)
def test_a_worker_that_keeps_dying_fails_the_comparison(local_ray: None, tmp_path: Path) -> None:
    cfg = load_config(overrides=[*CONFIG, "seeds=[0]", "policies=['tanbr']"])
    backend, calib, test = _fake()
    marker = tmp_path / "died"
    executor = RayExecutor(backend_factory=FakeFactory(backend, die=marker), retries=0)
    with pytest.raises(RuntimeError, match=r"running \S+ \(seed 0\) died 1 times"):
        execute(prepare(cfg, backend, calib, test), out=tmp_path / "ray", executor=executor)
    assert not (tmp_path / "ray").exists()


def test_a_failing_run_is_reported_and_leaves_no_run_folder(
    local_ray: None, tmp_path: Path
) -> None:
    cfg = load_config(overrides=[*CONFIG, "seeds=[0]", "policies=['tanbr']"])
    backend, calib, test = _fake()
    executor = RayExecutor(backend_factory=FakeFactory(backend, fail="no merge today"))
    with pytest.raises(ValueError, match="no merge today"):
        execute(prepare(cfg, backend, calib, test), out=tmp_path / "ray", executor=executor)
    assert not (tmp_path / "ray").exists()
