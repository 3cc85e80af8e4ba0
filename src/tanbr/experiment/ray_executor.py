"""(policy, seed) runs as Ray tasks on actors that each hold one model copy.

The local pool (:mod:`tanbr.experiment.parallel`) stops at one machine; this executor spreads
the same runs over a Ray cluster. What every run shares (the setup without its model, and the
request-signature and lower-state caches) is put in Ray's object store once and read by each
actor when it starts; each seed's stream is put once too. An actor builds its model from the
picklable backend factory and then runs job after job on it. A job whose actor dies (a node
lost, a process killed) is retried on a fresh actor, up to ``retries`` times; an error raised by
the run itself is not retried and reaches the caller as the run raised it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

import tanbr
from tanbr.backend.protocol import Backend
from tanbr.backend.requests import Slot
from tanbr.experiment.parallel import hand_over, start_worker, submission_order
from tanbr.experiment.runner import run_policy
from tanbr.experiment.values import PolicyRun, Setup

log = logging.getLogger(__name__)


class RunActor:
    """One model copy in one Ray worker process; runs (policy, seed) jobs one after another."""

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        shared: dict[str, Any],
        caches: Any,
        threads: int,
    ) -> None:
        self.setup: Setup = start_worker(backend_factory, shared, caches, threads)

    def run(self, name: str, seed: int, slots: list[Slot]) -> PolicyRun:
        return run_policy(self.setup, name, seed, slots, probe=False)

    def pid(self) -> int:
        """The worker's process id (the tests kill it to check the retry)."""
        return os.getpid()


@dataclass(frozen=True, kw_only=True)
class RayExecutor:
    """Runs an experiment's (policy, seed) jobs on Ray.

    ``address``: a running cluster to join (``ray://...`` or ``host:port``); None starts a local
    Ray with this machine's cores (or uses the one this process already started). ``actors``:
    model copies (0: one per CPU of the cluster, at most one per job); ``cpus``: CPUs each
    actor reserves, which are also its torch threads; ``retries``: fresh actors a job may be
    retried on after its actor died.
    """

    backend_factory: Callable[[], Backend]
    address: str | None = None
    actors: int = 0
    cpus: int = 1
    retries: int = 2

    def __post_init__(self) -> None:
        if self.actors < 0:
            raise ValueError(f"actors must be >= 0 (0: one per CPU), got {self.actors}")
        if self.cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {self.cpus}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    def __call__(
        self,
        setup: Setup,
        streams: Mapping[int, Sequence[Slot]],
        names: Sequence[str],
        bar: Any,
    ) -> list[PolicyRun]:
        started = connect(self.address)
        try:
            return self._run(setup, streams, names, bar)
        finally:
            if started:
                ray.shutdown()

    def _run(
        self,
        setup: Setup,
        streams: Mapping[int, Sequence[Slot]],
        names: Sequence[str],
        bar: Any,
    ) -> list[PolicyRun]:
        shared, caches = hand_over(setup, streams)
        refs = (ray.put(shared), ray.put(caches))  # once, whatever the number of runs
        slots = {seed: ray.put(list(stream)) for seed, stream in streams.items()}
        jobs = [(seed, name) for seed in streams for name in names]
        cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        n_actors = min(len(jobs), self.actors or max(1, cpus // self.cpus))
        remote = ray.remote(num_cpus=self.cpus, max_restarts=0)(RunActor)

        def new_actor() -> Any:
            return remote.remote(self.backend_factory, *refs, self.cpus)

        idle = [new_actor() for _ in range(n_actors)]
        log.info("ray: %d jobs on %d actors (%d CPUs in the cluster)", len(jobs), n_actors, cpus)
        todo = submission_order(jobs)
        attempts = dict.fromkeys(jobs, 0)
        running: dict[Any, tuple[tuple[int, str], Any]] = {}
        results: dict[tuple[int, str], PolicyRun] = {}
        try:
            while todo or running:
                while todo and idle:
                    job, actor = todo.pop(0), idle.pop()
                    seed, name = job
                    attempts[job] += 1
                    running[actor.run.remote(name, seed, slots[seed])] = (job, actor)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                job, actor = running.pop(ref)
                seed, name = job
                try:
                    results[job] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else err) from None
                except ray.exceptions.RayActorError as err:
                    if attempts[job] > self.retries:
                        raise RuntimeError(
                            f"the Ray worker running {name} (seed {seed}) died"
                            f" {attempts[job]} times; last: {_first_line(err)}"
                        ) from None
                    log.warning(
                        "the Ray worker running %s (seed %d) died (%s); retrying on a new"
                        " worker (attempt %d of %d)",
                        name,
                        seed,
                        _first_line(err),
                        attempts[job] + 1,
                        self.retries + 1,
                    )
                    todo.insert(0, job)
                    idle.append(new_actor())
                    continue
                idle.append(actor)
                if bar is not None:
                    bar.set_description(f"{name} (seed {seed}) done")
                    bar.update(len(streams[seed]))
        finally:
            for actor in idle + [actor for _, actor in running.values()]:
                ray.kill(actor)
        return [results[job] for job in jobs]


def connect(address: str | None) -> bool:
    """Join ``address``, or start a local Ray with this machine's cores; reuse a Ray this
    process already runs. Returns whether this call started it (so it shuts it down)."""
    if ray.is_initialized():
        return False
    if address:
        # the nodes need tanbr's dependencies; tanbr's own code travels with the job
        package = str(Path(tanbr.__file__).parent)
        ray.init(address=address, runtime_env={"py_modules": [package]})
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
