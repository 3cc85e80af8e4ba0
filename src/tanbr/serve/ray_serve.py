"""Serving replicas on Ray Serve: N model replicas behind one HTTP entry point, one controller.

Each replica is a Ray Serve deployment replica running the same FastAPI app as the
single-process service (:func:`~tanbr.serve.app.create_app`: the same endpoints and errors),
with :class:`ReplicaSlots` in place of the slot manager. A replica holds its own model, twice
(the standby copy shares the experts' tensors and owns only the merged weights), micro-batches
its predict calls, and follows the :class:`~tanbr.serve.ray_controller.SlotController` for
everything that learns: served requests, feedback, status and slot closes go to the controller;
plans come back from it by long poll, are built on the standby copy and swapped in.

Responses carry the header ``X-Tanbr-Replica`` (which replica answered, for operators and
tests).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request, Response
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tanbr.backend.protocol import Backend
from tanbr.backend.requests import Requests
from tanbr.experiment.loop import Decision, System, apply_decision
from tanbr.experiment.loop import serve as serve_batch
from tanbr.model.lean import map_large_allocations, return_freed_memory
from tanbr.serve.app import create_app
from tanbr.serve.batcher import Answer, Job, MicroBatcher, ServiceBusyError
from tanbr.serve.ledger import Completion
from tanbr.serve.metrics import ServiceMetrics
from tanbr.serve.ray_controller import Instruction, Signed, SlotController
from tanbr.serve.replicas import ServeConfig, standby_copy
from tanbr.serve.slots import Lease, ModelCopy
from tanbr.serve.state import FeedbackRow, RequestRow

logger = logging.getLogger(__name__)

APP_NAME = "tanbr"
NAMESPACE = "tanbr"
REPLICA_HEADER = "X-Tanbr-Replica"


def replica_backend(config: ServeConfig, meta: dict[str, Any]) -> Backend:
    """The model a replica serves: the controller's model, signature and precision (``meta``),
    loaded memory-lean for live requests."""
    from tanbr.backend.registry import BackendSpec, serving_backend
    from tanbr.experiment.config import load_config

    cfg = load_config(config.experiment, preset=config.preset, overrides=config.overrides)
    spec = BackendSpec.from_config(cfg).replace(memo=False)
    if config.model is not None:
        if Path(config.model).is_dir():
            spec = spec.replace(path=str(Path(config.model).resolve()))
        else:
            spec = spec.replace(variant=config.model, path="")
    if config.tasks is not None:
        spec = spec.replace(tasks=str(Path(config.tasks).resolve()))
    spec = spec.replace(signature=meta["signature"], dtype=meta.get("dtype", "float32"))
    backend = serving_backend(spec)
    if str(backend.checkpoint) != meta.get("model"):
        raise ValueError(
            f"this node loads model {backend.checkpoint}, the controller serves {meta.get('model')}"
        )
    release = getattr(backend, "release_bank", None)
    if release is not None:
        release()
    return backend


def _unwrap(err: BaseException) -> BaseException:
    """The exception the controller raised (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


class ReplicaSlots:
    """What the app asks of a slot manager, for one Ray Serve replica (see the module doc)."""

    def __init__(self, config: ServeConfig, controller: Any, metrics: ServiceMetrics) -> None:
        self.config = config
        self.controller = controller
        self.metrics = metrics
        self.replica_id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lock = threading.Condition()
        self._batcher = MicroBatcher(
            self._serve,
            max_batch=config.slots.max_batch,
            max_queue=config.slots.max_queue,
            wait_ms=config.slots.batch_wait_ms,
        )
        self._predict_ms: collections.deque[float] = collections.deque(maxlen=2048)
        self._failure: str | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.generative = False  # a causal LM (known once the model loads)
        self._rng = np.random.default_rng()

    def start(self) -> None:
        """Register with the controller, load the model and build the committed plan."""
        hello = self._call(self.controller.hello.remote(self.replica_id))
        self.labels = list(hello.labels)
        self.policy_name = hello.parts["mode"].name
        backend = replica_backend(self.config, hello.meta)
        self.generative = backend.kind == "lm"
        a = System(backend=backend, **hello.parts)
        b = standby_copy(a)
        self._copies = [ModelCopy(a), ModelCopy(b)]
        self._active = 0
        self._prepared = -1
        self._building = False  # the standby holds a merge being built or awaiting its commit
        apply_decision(a, hello.decision)
        self._copies[0].slot = hello.slot
        self._threads = [threading.Thread(target=self._follow, name="tanbr-follow", daemon=True)]
        for thread in self._threads:
            thread.start()
        if not self.generative:  # a language model's requests go through the generation engine
            self._batcher.start()
        logger.info("replica %s serves slot %d", self.replica_id, hello.slot)

    def stop(self) -> None:
        self._batcher.stop(10)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(10)

    # --- what the app calls ---------------------------------------------------------------

    @property
    def slot(self) -> int:
        return self._copies[self._active].slot

    @property
    def failure(self) -> str | None:
        return self._failure

    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future[list[Answer]]:
        return self._batcher.submit(texts)

    @property
    def backend(self) -> Backend:
        return self._copies[0].system.backend

    def lease(self) -> Lease:
        """Pin a generation that starts now to the active copy (it is not re-merged until
        :meth:`release`)."""
        with self._lock:
            if self._stopping:
                raise ServiceBusyError("the service is shutting down")
            copy = self._copies[self._active]
            copy.inflight += 1
            return Lease(slot=copy.slot, backend=copy.system.backend, replica=copy)

    def release(self, lease: Lease) -> None:
        self._rest(finished=lease.replica)

    def complete(self, completion: Completion, *, model_ms: float = 0.0) -> None:
        """A finished generation, durable at the controller (which counts it for its slot,
        and may score it for the label-free reward) before the client's stream ends."""
        self._call(self.controller.complete.remote(completion, model_ms))
        self.metrics.model_latency.observe(model_ms / 1e3)
        self.metrics.predictions.inc()

    def observe_latency(self, predict_ms: float) -> None:
        self._predict_ms.append(predict_ms)

    def feedback(
        self, request_id: str, *, label: str | None = None, reward: float | None = None
    ) -> FeedbackRow:
        row: FeedbackRow = self._call(
            self.controller.feedback.remote(request_id, label=label, reward=reward)
        )
        self.metrics.feedback.labels(kind="label" if label is not None else "reward").inc()
        return row

    def pending_feedback(self) -> int:
        return int(self._call(self.controller.pending_feedback.remote()))

    def close_slot(self, *, reason: str = "admin") -> tuple[int, int]:
        closed, slot = self._call(self.controller.close_slot.remote(reason))
        return int(closed), int(slot)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self._call(self.controller.status.remote())
        window = np.fromiter(self._predict_ms, dtype=np.float64)
        latency = status["latency"]
        latency["window"] = len(window)
        if len(window):
            latency["predict_p50_ms"] = round(float(np.quantile(window, 0.5)), 3)
            latency["predict_p99_ms"] = round(float(np.quantile(window, 0.99)), 3)
        return status

    # --- serving --------------------------------------------------------------------------

    def _serve(self, jobs: list[Job]) -> None:
        texts = [t for job in jobs for t in job.texts]
        with self._lock:
            copy = self._copies[self._active]
            copy.inflight += 1
            slot = copy.slot
        try:
            t0 = time.perf_counter()
            parts = []
            for start in range(0, len(texts), self.config.slots.max_batch):
                chunk = Requests(tuple(texts[start : start + self.config.slots.max_batch]))
                parts.append(np.asarray(serve_batch(copy.system, chunk).probs, dtype=np.float64))
            model_ms = (time.perf_counter() - t0) * 1e3
            signed = self._sign(copy.system, texts)
        finally:
            self._rest(finished=copy)
        probs = np.concatenate(parts, axis=0)  # (n, n_labels)
        top = probs.argmax(axis=1)
        now = time.time()
        answers = [
            Answer(uuid.uuid4().hex, slot, self.labels[int(k)], probs[i]) for i, k in enumerate(top)
        ]
        rows = [RequestRow(a.request_id, a.slot, a.label, now) for a in answers]
        # durable at the controller before any client sees an id
        tops = [int(k) for k in top]
        self._call(self.controller.record.remote(rows, texts, tops, model_ms, signed))
        self.metrics.model_latency.observe(model_ms / 1e3)
        self.metrics.batch_size.observe(len(texts))
        self.metrics.predictions.inc(len(texts))
        pos = 0
        for job in jobs:
            job.future.set_result(answers[pos : pos + len(job.texts)])
            pos += len(job.texts)

    def _sign(self, system: System, texts: Sequence[str]) -> Signed:
        """Signatures of a uniform sample of served texts, for the controller's estimator
        (about ``observe_max`` per slot; on the default model the serving forward recorded
        them, so this costs nothing). Sent, not recomputed: the controller's copy of the
        model then does no estimator pass of its own."""
        slots = self.config.slots
        rate = 1.0 if slots.observe_max == 0 else min(1.0, slots.observe_max / slots.slot_size)
        idx: list[int] = np.flatnonzero(self._rng.random(len(texts)) < rate).tolist()
        if not idx:
            return Signed((), np.zeros((0, 0)))
        sigs = system.backend.signatures(Requests(tuple(texts[i] for i in idx)))
        return Signed(tuple(idx), np.asarray(sigs, dtype=np.float64))

    # --- following the controller ---------------------------------------------------------

    def _follow(self) -> None:
        """Long-poll the controller; build what it prepares on the standby copy, swap on commit."""
        while not self._stopping:
            try:
                instruction: Instruction = self._call(
                    self.controller.sync.remote(self.replica_id, self.slot, self._prepared)
                )
                self._failure = instruction.failure
                if instruction.kind == "prepare":
                    assert instruction.decision is not None
                    self._prepare(instruction.slot, instruction.decision)
                elif instruction.kind == "commit":
                    assert instruction.decision is not None
                    if self._prepared != instruction.slot:
                        self._prepare(instruction.slot, instruction.decision, report=False)
                    self._swap(instruction.slot)
            except Exception as err:  # the controller restarting, or a merge failing
                logger.warning("following the controller failed: %s", _unwrap(err))
                self._failure = f"cannot follow the controller: {_unwrap(err)}"
                time.sleep(1.0)

    def _prepare(self, slot: int, decision: Decision, *, report: bool = True) -> None:
        with self._lock:
            standby = self._copies[1 - self._active]
            self._lock.wait_for(lambda: standby.inflight == 0)
            self._building = True  # until the swap: the prepared merge waits for its commit
            standby.rested = False
        merge_ms = apply_decision(standby.system, decision)
        standby.slot = -1
        self._prepared = slot
        if decision.kind == "merge":
            self.metrics.merges.inc()
            self.metrics.merge_latency.observe(merge_ms / 1e3)
        if report:
            memory = int(standby.system.backend.memory_bytes())
            self._call(self.controller.prepared.remote(self.replica_id, slot, merge_ms, memory))

    def _swap(self, slot: int) -> None:
        with self._lock:
            standby = self._copies[1 - self._active]
            standby.slot = slot
            self._active = 1 - self._active
            self._building = False
        self._rest()
        self.metrics.slot.set(slot)
        self._call(self.controller.swapped.remote(self.replica_id, slot))

    def _rest(self, *, finished: ModelCopy | None = None) -> None:
        """A forward on ``finished`` has ended (it may be re-merged once none runs on it); the
        copy that served the previous slot drops its merged experts once its last forward has
        ended (:meth:`~tanbr.serve.slots.ModelCopy.rest`)."""
        with self._lock:
            if finished is not None:
                finished.inflight -= 1
                self._lock.notify_all()
            rested = self._copies[1 - self._active].rest(building=self._building)
        if rested:
            return_freed_memory(collect=False)

    def _call(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            raise _unwrap(err) from None


@serve.ingress()
class TanbrReplica:
    """A Ray Serve replica: the service's app, its slots followed from the controller."""

    def __init__(self, config: ServeConfig, controller: str) -> None:
        map_large_allocations()  # (see tanbr serve: merged experts come and go)
        self.config = config
        self.controller = ray.get_actor(controller, namespace=NAMESPACE)

    def __serve_build_asgi_app__(self) -> FastAPI:
        def start(metrics: ServiceMetrics) -> ReplicaSlots:
            slots = ReplicaSlots(self.config, self.controller, metrics)
            slots.start()
            self.replica_id = slots.replica_id
            return slots

        app = create_app(self.config, start=start)

        @app.middleware("http")
        async def name_the_replica(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = getattr(self, "replica_id", "")
            return response

        return app


@dataclass
class RayService:
    """A running service on Ray: its URL, controller and how to stop it."""

    url: str
    controller: Any
    started_ray: bool

    def propagation_ms(self) -> list[float]:
        return list(ray.get(self.controller.propagation_ms.remote()))

    def replicas(self) -> dict[str, int]:
        return dict(ray.get(self.controller.replicas.remote()))

    def shutdown(self) -> None:
        """Stop the replicas, then the controller (it releases the state folder's lock)."""
        try:
            serve.delete(APP_NAME)
        finally:
            try:
                ray.get(self.controller.stop.remote(), timeout=60)
            finally:
                ray.kill(self.controller)
                if self.started_ray:
                    serve.shutdown()  # type: ignore[no-untyped-call]
                    ray.shutdown()


def start_controller(config: ServeConfig, name: str) -> Any:
    """The controller actor, on this node (the state folder is a local path), opened: raises
    :class:`~tanbr.serve.state.StateFolderInUseError` when another controller or
    ``tanbr serve`` holds the folder."""
    node = ray.get_runtime_context().get_node_id()
    controller: Any = (
        ray.remote(SlotController)
        .options(
            name=name,
            namespace=NAMESPACE,
            max_concurrency=64,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        )
        .remote(config)
    )
    try:
        ray.get(controller.open.remote())
    except ray.exceptions.RayTaskError as err:
        ray.kill(controller)
        raise _unwrap(err) from None
    return controller


def start_service(
    config: ServeConfig,
    *,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    replica_cpus: float = 1.0,
) -> RayService:
    """Start (or join) Ray, the controller and ``replicas`` replicas behind Ray Serve's HTTP
    proxy on ``host:port``; returns once every replica serves."""
    from tanbr.experiment.ray_executor import connect

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    started = connect(address)
    if APP_NAME in serve.status().applications:  # one proxy and route "/" per cluster
        if started:
            ray.shutdown()
        raise ValueError(
            f"a tanbr service already runs on this Ray cluster (Ray Serve application "
            f"{APP_NAME!r}); stop it, or serve on another cluster"
        )
    name = f"tanbr-controller-{uuid.uuid4().hex[:8]}"
    try:
        controller = start_controller(config, name)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    try:
        serve.start(http_options={"host": host, "port": port})
        deployment: Any = serve.deployment(
            TanbrReplica,
            name="replica",
            num_replicas=replicas,
            ray_actor_options={"num_cpus": replica_cpus},
            # a replica batches what is in flight and bounds its own queue (503 when full), as
            # the single-process service does: Ray Serve's default of 5 calls in flight would
            # cap its micro-batches at 5 texts and queue the rest in the proxy
            max_ongoing_requests=config.slots.max_queue,
            logging_config={"enable_access_log": False},  # as uvicorn's in the single process
            health_check_period_s=2,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=5,
        )
        serve.run(deployment.bind(config, name), name=APP_NAME, route_prefix="/")
    except BaseException:
        ray.get(controller.stop.remote())
        ray.kill(controller)
        if started:
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
        raise
    return RayService(f"http://{host}:{port}", controller, started)
