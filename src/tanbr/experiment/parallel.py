"""(policy, seed) runs spread over spawned processes, each serving with its own model copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tanbr.backend.protocol import Backend
from tanbr.backend.requests import Requests, Slot
from tanbr.experiment.runner import run_policy
from tanbr.experiment.values import PolicyRun, Setup

_WORKER: dict[str, Any] = {}


def run_parallel(
    setup: Setup,
    streams: Mapping[int, Sequence[Slot]],
    names: Sequence[str],
    workers: int,
    backend_factory: Callable[[], Backend],
    bar: Any,
) -> list[PolicyRun]:
    """Run the (policy, seed) jobs of ``names`` in ``workers`` spawned processes.

    The setup travels without its backend; each process builds its own from the factory and
    receives the parent's request-signature caches, which are filled here first so that no
    process recomputes them. Threads per process: the parent's count split evenly."""
    import concurrent.futures
    import multiprocessing

    import torch

    shared, caches = hand_over(setup, streams)
    threads = max(1, torch.get_num_threads() // workers)
    jobs = [(seed, name) for seed in streams for name in names]
    results: dict[tuple[int, str], PolicyRun] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(backend_factory, shared, caches, threads),
    ) as pool:
        futures = {
            pool.submit(_worker_run, name, seed, list(streams[seed])): (seed, name)
            for seed, name in submission_order(jobs)
        }
        for future in concurrent.futures.as_completed(futures):
            seed, name = futures[future]
            results[(seed, name)] = future.result()
            if bar is not None:
                bar.set_description(f"{name} (seed {seed}) done")
                bar.update(len(streams[seed]))
    return [results[job] for job in jobs]


def hand_over(setup: Setup, streams: Mapping[int, Sequence[Slot]]) -> tuple[dict[str, Any], Any]:
    """What a worker needs beside its own model: the setup's fields without the backend, and
    the backend's request-signature caches, filled here first for every request of the streams
    so that no worker recomputes them (None when the backend keeps no caches)."""
    backend = setup.backend
    rows = sorted(
        {int(r) for slots in streams.values() for s in slots if s.requests.rows is not None
         for r in s.requests.rows}
    )  # fmt: skip
    if rows and hasattr(backend, "texts"):
        texts = backend.texts
        backend.signatures(Requests(tuple(texts[r] for r in rows), np.asarray(rows)))
    caches = backend.export_caches() if hasattr(backend, "export_caches") else None
    shared = {f.name: getattr(setup, f.name) for f in dataclasses.fields(setup)}
    shared.pop("backend")
    return shared, caches


#: Relative cost of a run: a policy whose merge changes every slot (bandits, plug-in, the slot
#: oracle) gets no memo hit and costs most; soft merging runs one merge per request (memoised);
#: the static merges and the full MoE are computed once per request.
RUN_COST = {"uniform": 0, "frequency": 0, "full-moe": 1, "task-oracle": 1, "smear": 2}


def submission_order(jobs: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """Longest jobs first, so that no worker starts a long run while the other idles at the end;
    within a cost the configured order is kept."""
    return sorted(jobs, key=lambda job: -RUN_COST.get(job[1], 3))


def worker_setup(
    backend_factory: Callable[[], Backend], shared: dict[str, Any], caches: Any
) -> Setup:
    """A worker's setup: its own model from the factory, with the caches handed over."""
    backend = backend_factory()
    if caches is not None and hasattr(backend, "import_caches"):
        backend.import_caches(caches)
    return Setup(backend=backend, **shared)


def start_worker(
    backend_factory: Callable[[], Backend],
    shared: dict[str, Any],
    caches: Any,
    threads: int,
) -> Setup:
    """A worker's set-up, its torch threads set: a pool process's, or a Ray actor's."""
    import torch

    torch.set_num_threads(threads)
    return worker_setup(backend_factory, shared, caches)


def _init_worker(
    backend_factory: Callable[[], Backend],
    shared: dict[str, Any],
    caches: Any,
    threads: int,
) -> None:
    _WORKER["setup"] = start_worker(backend_factory, shared, caches, threads)


def _worker_run(name: str, seed: int, slots: list[Slot]) -> PolicyRun:
    return run_policy(_WORKER["setup"], name, seed, slots, probe=False)
