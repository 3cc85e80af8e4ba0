"""The slot manager: groups live requests into slots and swaps merged models between them.

Three moving parts, each on its own thread so that no HTTP request ever waits for a merge:

* **Micro-batcher** (one inference thread). Predict calls enqueue their texts; the thread takes
  whatever is queued (up to ``max_batch`` texts), serves it on the *active* replica with the
  loop's :func:`~tanbr.experiment.loop.serve`, records the served requests durably and answers.
  Batching the backlog of concurrent clients is what lets a 2-core box keep up with many.
* **Boundary thread.** When the active slot has served ``slot_size`` texts, ``slot_seconds``
  after its first text, or on an admin call, it runs the slot boundary with the loop's phase
  functions, off the request path: :func:`~tanbr.experiment.loop.feedback` (reward and policy
  update from the feedback acknowledged since the last boundary, each for the slot that served
  it), :func:`~tanbr.experiment.loop.observe` (the closing slot's texts join the estimator's
  history), :func:`~tanbr.experiment.loop.decide` and
  :func:`~tanbr.experiment.loop.apply_decision` on the *standby* replica; then it persists the
  state and swaps.
* **Two replicas** (double buffering): two :class:`~tanbr.experiment.loop.System` objects that
  share the estimator, the mode (policy) and the rng but each own a model. The standby replica
  is re-merged while the active one keeps serving; the swap is one index assignment under a
  lock, so a forward runs entirely on one merged model and never sees a half-built one. A
  replica is touched by the boundary only once the forwards still running on it have finished.

Requests that arrive while the next slot is being built are still served, and counted, by the
closing slot, so a slot serves at least ``slot_size`` texts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tanbr.backend.requests import Requests
from tanbr.backend.scorers import Agreement
from tanbr.experiment.loop import (
    Decision,
    System,
    apply_decision,
    decide,
    feedback,
    observe,
    serve,
)
from tanbr.experiment.reward import Outcomes
from tanbr.serve.metrics import ServiceMetrics
from tanbr.serve.state import FeedbackRow, RequestRow, SlotRow, StateStore, UpdateRow

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SlotConfig:
    """When slots close and how requests are batched.

    A slot closes after ``slot_size`` texts, or ``slot_seconds`` after its first text when set
    (an idle service does not re-merge for nothing). At a boundary the estimator observes at
    most ``observe_max`` of the closing slot's texts (a uniform sample, 0: all of them):
    computing signatures means running the encoder again, and the cluster frequencies of a
    uniform sample estimate the slot's mix without bias. ``shadow``: requests of each closing
    slot (a uniform sample) scored against the full MoE at the boundary, off the request path,
    as a label-free reward, so the policy learns with no client feedback (None: the reward's
    probe size when the reward is label-free, else 0).
    """

    slot_size: int = 256
    slot_seconds: float | None = None
    max_batch: int = 64
    batch_wait_ms: float = 0.0
    max_queue: int = 1024
    observe_max: int = 64
    shadow: int | None = None

    def __post_init__(self) -> None:
        if self.slot_size < 1:
            raise ValueError(f"slot_size must be >= 1, got {self.slot_size}")
        if self.slot_seconds is not None and not self.slot_seconds > 0:
            raise ValueError(f"slot_seconds must be > 0 (or unset), got {self.slot_seconds}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be in [0, 1000], got {self.batch_wait_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.observe_max < 0:
            raise ValueError(f"observe_max must be >= 0, got {self.observe_max}")
        if self.shadow is not None and self.shadow < 0:
            raise ValueError(f"shadow must be >= 0 (or unset), got {self.shadow}")


class ServiceBusyError(RuntimeError):
    """The request queue is full: the service is overloaded (a 503, not a client error)."""


@dataclass(frozen=True)
class Answer:
    """What a predict call gets back for one text."""

    request_id: str
    slot: int
    label: str
    probs: np.ndarray  # (n_labels,)


# --- internals ------------------------------------------------------------------------------


class _Replica:
    """A System (one model copy) plus the number of forwards running on it."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.slot = -1
        self.inflight = 0


@dataclass
class _Job:
    texts: list[str]
    future: concurrent.futures.Future[list[Answer]]


_WINDOW = 2048  # latency observations kept for /v1/status
_KEEP_DECISIONS = 64  # recent decisions kept in memory and in the snapshot


class SlotManager:
    """Owns the replicas, the batcher and the boundary thread; see the module docstring.

    ``systems`` are the two replicas; they must share their estimator, mode and rng (the
    learning state) and differ in their backend (the model copy).
    """

    def __init__(
        self,
        systems: Sequence[System],
        *,
        labels: Sequence[str],
        meta: Mapping[str, Any] | None = None,
        store: StateStore,
        metrics: ServiceMetrics,
        config: SlotConfig,
    ) -> None:
        if len(systems) != 2:
            raise ValueError(f"the slot manager needs 2 replicas, got {len(systems)}")
        a, b = systems
        if a.backend is b.backend:
            raise ValueError("the two replicas must have their own backend (model copy)")
        if a.estimator is not b.estimator or a.mode is not b.mode or a.rng is not b.rng:
            raise ValueError("the two replicas must share their estimator, mode and rng")
        if a.mode.needs_truth or a.estimator.reads_tags:
            raise ValueError(
                f"policy {a.mode.name!r} with estimator {a.estimator.name!r} reads task tags;"
                " live requests carry none"
            )
        if len(labels) != a.backend.n_labels:
            raise ValueError(f"{len(labels)} label names for {a.backend.n_labels} model outputs")
        self.labels = list(labels)
        self.meta = dict(meta or {})
        self.store = store
        self.metrics = metrics
        self.config = config
        self.policy_name = a.mode.name
        self._lock = threading.Condition()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=config.max_queue)
        self._replicas = [_Replica(a), _Replica(b)]
        self._active = 0
        # learning state: touched by the boundary thread only, once started; decisions of
        # older slots than the last few are read back from the slot history when needed
        self._decisions: dict[int, Decision] = {}
        self._watermark = 0
        self._merges = 0
        self._updates = 0
        # slot bookkeeping (under _lock)
        self._slot = -1
        self._slot_opened = time.time()
        self._slot_first_request: float | None = None
        self._slot_served = 0
        self._slot_latency_ms = 0.0
        self._served_total = 0
        # served since the last boundary (text, label index): the estimator's history, and the
        # shadow reward's sample
        self._texts: list[str] = []
        self._served_labels: list[int] = []
        scorer = a.scorer
        self.shadow = (
            config.shadow
            if config.shadow is not None
            else (0 if scorer.needs_truth else a.labelling.probe)
        )
        self._boundary_reason: str | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self._predict_ms: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._model_ms: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._merge_ms: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._boundary_ms: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._threads: list[threading.Thread] = []

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Resume from the snapshot (or open slot 0), then start the threads."""
        snapshot = self.store.load_snapshot()
        replica = self._replicas[self._active]
        if snapshot is None:
            decision = decide(replica.system, slot=0)
            merge_ms = self._build(replica, decision)
            self._decisions[0] = decision
            self._record_slot(0, decision, merge_ms, replica)
            self._open(0)
            self._persist(0)
            logger.info("fresh state: slot 0 serves (%s)", decision.kind)
        else:
            slot = self._restore(snapshot)
            self._build(replica, self._decisions[slot])  # the slot's merged model, again
            self._open(slot)
            served = self.store.served(slot)  # the estimator's view of the open slot
            index = {label: i for i, label in enumerate(self.labels)}
            self._texts = [text for text, _ in served]
            self._served_labels = [index.get(label, -1) for _, label in served]
            self._persist(slot)
            logger.info(
                "resumed at slot %d (%d texts served in it, %d feedback pending)",
                slot,
                self._slot_served,
                self.pending_feedback(),
            )
        replica.slot = self._slot
        self._served_total = self.store.count_requests()
        self._threads = [
            threading.Thread(target=self._batch_loop, name="tanbr-batcher", daemon=True),
            threading.Thread(target=self._boundary_loop, name="tanbr-boundary", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Answer what is queued, stop the threads (the state is already durable) and put the
        models back as they were loaded (a model may be shared within the process)."""
        self._queue.put(None)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        if not any(t.is_alive() for t in self._threads):
            for replica in self._replicas:
                replica.system.backend.restore()
        self._threads = []

    # --- request path -------------------------------------------------------------------

    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future[list[Answer]]:
        """Queue texts for the next micro-batch; the future resolves to one answer per text."""
        if self._stopping:
            raise ServiceBusyError("the service is shutting down")
        job = _Job(list(texts), concurrent.futures.Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServiceBusyError(
                f"request queue is full ({self.config.max_queue} calls waiting)"
            ) from None
        return job.future

    def observe_latency(self, predict_ms: float) -> None:
        """Record a predict call's wall time (for /v1/status)."""
        self._predict_ms.append(predict_ms)

    def feedback(
        self, request_id: str, *, label: str | None = None, reward: float | None = None
    ) -> FeedbackRow:
        """Acknowledge feedback durably; the policy learns it at the next slot boundary."""
        row = self.store.add_feedback(request_id, label=label, reward=reward)
        self.metrics.feedback.labels(kind="label" if label is not None else "reward").inc()
        return row

    def pending_feedback(self) -> int:
        """Acknowledged feedback the policy has not learned from yet."""
        return max(0, self.store.last_feedback_seq() - self._watermark)

    def close_slot(self, *, reason: str = "admin", timeout: float = 300.0) -> tuple[int, int]:
        """Close the current slot now and wait until the next one serves: (closed, new)."""
        with self._lock:
            self._check_alive()
            closing = self._slot
            self._request_boundary(reason)
            done = self._lock.wait_for(
                lambda: self._slot != closing or self._failure is not None or self._stopping,
                timeout,
            )
            self._check_alive()
            if not done:
                raise TimeoutError(f"slot {closing} did not close within {timeout} s")
            return closing, self._slot

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A consistent view for /v1/status."""
        with self._lock:
            slot = self._slot
            decision = self._decisions[slot]
            served = self._slot_served
            opened = self._slot_opened
            total = self._served_total
            merges = self._merges
            updates = self._updates
        plan = decision.plan or {}
        return {
            "slot": slot,
            "slot_requests": served,
            "slot_age_s": round(time.time() - opened, 3),
            "slot_size": self.config.slot_size,
            "slot_seconds": self.config.slot_seconds,
            "policy": self.policy_name,
            "kind": decision.kind,
            "mix": _floats(decision.mix),
            "action": [] if decision.action is None else _floats(decision.action),
            "coeffs": {name: _floats(c) for name, c in plan.items()},
            "merges": merges,
            "requests": total,
            "feedback": self.store.count_feedback(),
            "pending_feedback": self.pending_feedback(),
            "policy_updates": updates,
            "latency": {
                "window": len(self._predict_ms),
                "predict_p50_ms": _quantile(self._predict_ms, 0.5),
                "predict_p99_ms": _quantile(self._predict_ms, 0.99),
                "model_p50_ms": _quantile(self._model_ms, 0.5),
                "merge_p50_ms": _quantile(self._merge_ms, 0.5),
                "boundary_p50_ms": _quantile(self._boundary_ms, 0.5),
            },
        }

    @property
    def slot(self) -> int:
        return self._slot

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the boundary thread, if any (the health check reports it)."""
        return self._failure

    # --- the micro-batcher --------------------------------------------------------------

    def _batch_loop(self) -> None:
        wait_s = self.config.batch_wait_ms / 1000.0
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            n = len(job.texts)
            deadline = time.monotonic() + wait_s
            while n < self.config.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        nxt = self._queue.get(timeout=remaining)
                    else:
                        nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # keep the stop marker for the outer loop
                    break
                jobs.append(nxt)
                n += len(nxt.texts)
            try:
                self._serve(jobs)
            except Exception:
                # one call's texts must not fail the others batched with it: serve each alone
                if len(jobs) == 1:
                    self._fail(jobs[0])
                    continue
                for j in jobs:
                    try:
                        self._serve([j])
                    except Exception:
                        self._fail(j)

    def _fail(self, job: _Job) -> None:
        logger.exception("serving %d texts failed", len(job.texts))
        if not job.future.done():
            job.future.set_exception(RuntimeError("the model failed on this request"))

    def _serve(self, jobs: list[_Job]) -> None:
        texts = [t for job in jobs for t in job.texts]
        with self._lock:
            replica = self._replicas[self._active]
            replica.inflight += 1
            slot = replica.slot
        try:
            t0 = time.perf_counter()
            parts: list[np.ndarray] = []
            latency_ms = 0.0
            for start in range(0, len(texts), self.config.max_batch):
                chunk = Requests(tuple(texts[start : start + self.config.max_batch]))
                served = serve(replica.system, chunk)
                parts.append(np.asarray(served.probs, dtype=np.float64))  # (m, n_labels)
                latency_ms += served.latency_ms
            model_ms = (time.perf_counter() - t0) * 1e3
        finally:
            with self._lock:
                replica.inflight -= 1
                self._lock.notify_all()
        probs = np.concatenate(parts, axis=0)  # (n, n_labels)
        top = probs.argmax(axis=1)  # (n,)
        now = time.time()
        answers = [
            Answer(uuid.uuid4().hex, slot, self.labels[int(k)], probs[i]) for i, k in enumerate(top)
        ]
        # durable before any client sees an id, so feedback for it is always accepted
        self.store.add_requests(
            [RequestRow(a.request_id, a.slot, a.label, now) for a in answers], texts=texts
        )
        self._model_ms.append(model_ms)
        self.metrics.model_latency.observe(model_ms / 1e3)
        self.metrics.batch_size.observe(len(texts))
        self.metrics.predictions.inc(len(texts))
        with self._lock:
            self._served_total += len(texts)
            self._texts.extend(texts)
            self._served_labels.extend(int(k) for k in top)
            if slot == self._slot:
                self._slot_served += len(texts)
                self._slot_latency_ms += latency_ms
                if self._slot_first_request is None:
                    self._slot_first_request = now
                    self._lock.notify_all()  # the boundary thread starts the slot's clock
                if self._slot_served >= self.config.slot_size:
                    self._request_boundary("count")
            served_now = self._slot_served
        self.metrics.slot_requests.set(served_now)
        pos = 0
        for job in jobs:
            job.future.set_result(answers[pos : pos + len(job.texts)])
            pos += len(job.texts)

    # --- slot boundaries ----------------------------------------------------------------

    def _request_boundary(self, reason: str) -> None:
        """Ask the boundary thread to close the current slot (caller holds ``_lock``)."""
        if self._boundary_reason is None:
            self._boundary_reason = reason
            self._lock.notify_all()

    def _boundary_loop(self) -> None:
        while True:
            with self._lock:
                while self._boundary_reason is None and not self._stopping:
                    timeout = None
                    if self.config.slot_seconds is not None and self._slot_first_request:
                        due = self._slot_first_request + self.config.slot_seconds
                        timeout = due - time.time()
                        if timeout <= 0:
                            self._boundary_reason = "time"
                            break
                    self._lock.wait(timeout)
                if self._stopping:
                    return
                reason = self._boundary_reason
            assert reason is not None
            try:
                self._turn(reason)
            except Exception as err:
                logger.exception("slot boundary failed; the current slot keeps serving")
                with self._lock:
                    self._failure = err
                    self._lock.notify_all()
                return

    def _turn(self, reason: str) -> None:
        """One slot boundary, off the request path (runs on the boundary thread)."""
        closing = self._slot
        nxt = closing + 1
        clock = _Clock()
        with self._lock:
            latency_ms = self._slot_latency_ms
        # --- 6-7. reward and policy update from the feedback acknowledged so far; late
        # feedback counts for the slot that served the request (its own decision)
        upto = self.store.last_feedback_seq()
        updates = self._learn(self.store.feedback_after(self._watermark, upto=upto), upto)
        clock.lap("learn")
        # --- the standby replica: wait until no forward runs on it any more
        with self._lock:
            standby = self._replicas[1 - self._active]
            self._lock.wait_for(lambda: standby.inflight == 0)
            texts, self._texts = self._texts, []
            served_labels, self._served_labels = self._served_labels, []
        clock.lap("wait")
        # --- the shadow reward: a sample of the closing slot against the full MoE, on the idle
        # standby replica (label-free; nothing waits for it)
        shadow = self._shadow_reward(standby, closing, texts, served_labels, latency_ms, upto)
        if shadow is not None:
            updates.append(shadow)
        clock.lap("shadow")
        # --- the served texts join the estimator's history (the mix is the context of a
        # learning policy; baselines ignore it and skip the cost); 1-3. estimate, select, plan
        if standby.system.mode.learns:
            observe(standby.system, Requests(tuple(self._sample(texts, closing))))
        clock.lap("observe")
        decision = decide(standby.system, slot=nxt)
        clock.lap("decide")
        # --- 4. merge, on the standby replica
        merge_ms = self._build(standby, decision)
        clock.lap("merge")
        # --- persist (slot history, then the snapshot that commits it all), then swap
        self.store.close_slot(closing, reason=reason, latency_ms=latency_ms)
        self.store.add_updates(updates)
        self._decisions[nxt] = decision
        for old in [s for s in self._decisions if s <= nxt - _KEEP_DECISIONS]:
            del self._decisions[old]
        self._watermark = upto
        self._updates += len(updates)
        self._record_slot(nxt, decision, merge_ms, standby)
        self._persist(nxt)
        clock.lap("persist")
        with self._lock:
            standby.slot = nxt
            self._active = 1 - self._active
            self._open(nxt)
            self._boundary_reason = None
            self._lock.notify_all()
        self._boundary_ms.append(clock.total_ms)
        logger.info(
            "slot %d closed (%s); slot %d serves (%s, %d policy updates); boundary %s",
            closing,
            reason,
            nxt,
            decision.kind,
            len(updates),
            clock,
        )

    def _shadow_reward(
        self,
        replica: _Replica,
        slot: int,
        texts: list[str],
        labels: list[int],
        latency_ms: float,
        upto: int,
    ) -> UpdateRow | None:
        """Score a sample of a closed slot's served labels against the full MoE's and learn it
        as that slot's reward (the proxy scorer: no label involved)."""
        if self.shadow <= 0 or not texts or slot not in self._decisions:
            return None
        rng = np.random.default_rng([slot, 11])
        pick = np.sort(rng.choice(len(texts), size=min(self.shadow, len(texts)), replace=False))
        requests = Requests(tuple(texts[i] for i in pick))
        served = np.asarray([labels[i] for i in pick], dtype=np.int64)
        scores = Agreement().score(replica.system.backend, requests, served, None)
        memory = replica.system.backend.memory_bytes()
        hits = float(scores.sum())
        outcomes = Outcomes(hits, len(pick), latency_ms=latency_ms, memory_bytes=memory)
        reward = feedback(replica.system, self._decisions[slot], outcomes)
        if reward is None:
            return None
        self.metrics.policy_updates.inc()
        self.metrics.last_reward.set(reward)
        return UpdateRow(slot, reward, len(pick), upto, time.time())

    def _sample(self, texts: list[str], slot: int) -> list[str]:
        """At most ``observe_max`` texts, uniformly (seeded by the slot: reproducible)."""
        limit = self.config.observe_max
        if limit == 0 or len(texts) <= limit:
            return texts
        keep = np.random.default_rng(slot).choice(len(texts), size=limit, replace=False)
        return [texts[i] for i in np.sort(keep)]

    def _learn(self, rows: Sequence[FeedbackRow], upto: int) -> list[UpdateRow]:
        """One reward and policy update per slot that got feedback since the last boundary."""
        by_slot: dict[int, list[FeedbackRow]] = {}
        for row in rows:
            by_slot.setdefault(row.slot, []).append(row)
        system = self._replicas[0].system  # the policy is shared by both replicas
        updates = []
        now = time.time()
        for slot, slot_rows in sorted(by_slot.items()):
            decision, latency_ms, memory = self._decision_of(slot)
            reward = feedback(system, decision, _outcomes(slot_rows, latency_ms, memory))
            if reward is None:
                continue
            updates.append(UpdateRow(slot, reward, len(slot_rows), upto, now))
            self.metrics.policy_updates.inc()
            self.metrics.last_reward.set(reward)
        return updates

    def _decision_of(self, slot: int) -> tuple[Decision, float, int]:
        """A served slot's decision, its requests' model time (ms) and its model's memory."""
        row = self.store.slot(slot)
        if row is None:
            raise RuntimeError(f"slot {slot} served requests but has no history entry")
        decision = self._decisions.get(slot)
        if decision is None:  # an old slot: its decision, as recorded at full precision
            decision = Decision(
                slot=slot,
                mix=np.asarray(row.mix, dtype=np.float64),
                kind=row.kind,
                action=None if row.action is None else np.asarray(row.action, dtype=np.float64),
                plan=None
                if row.plan is None
                else {k: np.asarray(v, dtype=np.float64) for k, v in row.plan.items()},
            )
        latency_ms = self._slot_latency_ms if slot == self._slot else row.latency_ms
        return decision, latency_ms, row.memory_bytes

    def _build(self, replica: _Replica, decision: Decision) -> float:
        merge_ms = apply_decision(replica.system, decision)
        if decision.kind == "merge":
            self._merges += 1
            self.metrics.merges.inc()
            self.metrics.merge_latency.observe(merge_ms / 1e3)
            self._merge_ms.append(merge_ms)
        return merge_ms

    def _open(self, slot: int) -> None:
        """Bookkeeping for the slot that now serves (texts it served before a restart count)."""
        self._slot = slot
        self._slot_opened = time.time()
        self._slot_served = self.store.count_requests(slot)
        self._slot_first_request = time.time() if self._slot_served else None
        self._slot_latency_ms = 0.0
        self.metrics.slot.set(slot)
        self.metrics.slot_requests.set(self._slot_served)

    def _record_slot(
        self, slot: int, decision: Decision, merge_ms: float, replica: _Replica
    ) -> None:
        plan = decision.plan
        self.store.open_slot(
            SlotRow(
                slot=slot,
                opened=time.time(),
                kind=decision.kind,
                mix=tuple(_exact(decision.mix)),
                action=None if decision.action is None else tuple(_exact(decision.action)),
                plan=None if plan is None else {k: tuple(_exact(v)) for k, v in plan.items()},
                merge_ms=merge_ms,
                memory_bytes=int(replica.system.backend.memory_bytes()),
            )
        )

    def _persist(self, slot: int) -> None:
        """Snapshot the learning state; ``slot`` is the slot that serves from now on.

        The rename of the snapshot is the commit point of a boundary: rows the slot history
        gained after the previous snapshot are rolled back on restart if this never happens.
        """
        system = self._replicas[0].system
        self.store.save_snapshot(
            {
                "slot": slot,
                "watermark": self._watermark,
                "merges": self._merges,
                "updates": self._updates,
                "decisions": self._decisions,
                "estimator": system.estimator,
                "mode": system.mode,
                "reward": system.reward,
                "rng": system.rng,
                "meta": self.meta,
            }
        )

    def _restore(self, snapshot: dict[str, Any]) -> int:
        """Load the learning state into both replicas; returns the slot that serves."""
        try:
            slot = int(snapshot["slot"])
            self._watermark = int(snapshot["watermark"])
            self._merges = int(snapshot["merges"])
            self._updates = int(snapshot["updates"])
            self._decisions = dict(snapshot["decisions"])
            estimator, mode, rng = snapshot["estimator"], snapshot["mode"], snapshot["rng"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"snapshot in {self.store.folder} is incomplete: {err}") from err
        if mode.name != self.policy_name:
            raise ValueError(
                f"state folder {self.store.folder} belongs to policy {mode.name!r}, not"
                f" {self.policy_name!r}; use another --state-dir"
            )
        if slot not in self._decisions:
            raise ValueError(f"snapshot in {self.store.folder} has no decision for slot {slot}")
        for replica in self._replicas:
            replica.system.estimator = estimator
            replica.system.mode = mode
            replica.system.rng = rng
        self.store.rollback(slot=slot, watermark=self._watermark)
        return slot

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"slot boundary failed: {self._failure}")
        if self._stopping:
            raise ServiceBusyError("the service is shutting down")


class _Clock:
    """Wall time of the phases of a slot boundary, for the log."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._laps.append((name, (now - self._last) * 1e3))
        self._last = now

    @property
    def total_ms(self) -> float:
        return (self._last - self._start) * 1e3

    def __str__(self) -> str:
        laps = ", ".join(f"{name} {ms:.0f}" for name, ms in self._laps)
        return f"{self.total_ms:.0f} ms ({laps})"


def _outcomes(rows: Sequence[FeedbackRow], latency_ms: float, memory: int) -> Outcomes:
    """A slot's feedback as the loop's outcomes: label hits, or the mean of given rewards.

    When a slot got both labels and rewards, a label counts as a reward of 1 (right) or 0
    (wrong) and the reward is the mean over all of its feedback.
    """
    labelled = [r for r in rows if r.label is not None]
    hits = sum(r.label == r.predicted for r in labelled)
    given = [r.reward for r in rows if r.reward is not None]
    if not given:
        return Outcomes(hits, len(labelled), latency_ms=latency_ms, memory_bytes=memory)
    mean = (hits + sum(given)) / (len(labelled) + len(given))
    return Outcomes(
        hits,
        len(labelled),
        latency_ms=latency_ms,
        memory_bytes=memory,
        reward=min(1.0, max(0.0, mean)),
    )


def _exact(x: Any) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=np.float64).ravel()]


def _floats(x: Any, digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in np.asarray(x, dtype=np.float64).ravel()]


def _quantile(values: collections.deque[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.quantile(np.fromiter(values, dtype=np.float64), q)), 3)
