"""The one controller of a service whose replicas run on Ray Serve.

The single-process service (:mod:`tanbr.serve.slots`) owns two model copies and its learning
state in one process. On Ray the two jobs part: N replica deployments each hold a model and
serve, and this controller (one Ray actor, pinned to the node that started the service) owns
the estimator, the policy and the state store. It takes the state folder's lock
(:class:`~tanbr.serve.state.StateLock`), so a second controller, or a single-process
``tanbr serve``, on the same folder is refused.

What crosses the network per slot is the plan, never the weights: every replica holds the
experts and builds the merged model itself. A slot boundary is two-phased so that every
replica swaps within one round trip of the others, and none ever serves a half-built model:

1. *learn, estimate, decide*: feedback acknowledged since the last boundary updates the policy
   (each for the slot that served it), a sample of the closing slot's texts joins the
   estimator's history (their signatures sent by the replicas that served them, computed
   here only for texts restored after a restart; the controller's own copy of the model
   gives the shadow reward), and the next slot's decision is made, with the loop's phase
   functions (:mod:`tanbr.experiment.loop`);
2. *prepare*: each live replica builds the decision on its standby copy while its active copy
   keeps serving, and says so;
3. *persist*: the slot history and the snapshot (the commit point, as in the single process);
4. *commit*: each replica swaps (requests in flight finish on the model they started on) and
   says so; the time from the decision to the last swap is the plan-propagation time.

Replicas reach the controller by long polls (:meth:`SlotController.sync`), so a replica that
Ray Serve restarts simply asks again and builds the committed plan before it takes traffic. A
replica that stops polling for ``stale_s`` is no longer waited for. Served requests and
feedback are committed to the state store here before the client's answer leaves the replica,
so killing a replica loses no acknowledged feedback.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tanbr.backend.requests import Requests
from tanbr.experiment.loop import Decision, decide, observe
from tanbr.serve.boundaries import BoundarySchedule
from tanbr.serve.ledger import Completion, SlotLedger
from tanbr.serve.replicas import ServeConfig, build_replicas
from tanbr.serve.state import (
    FeedbackRow,
    RequestRow,
    StateLock,
    StateStore,
)

logger = logging.getLogger(__name__)

_WINDOW = 2048


@dataclass(frozen=True)
class Hello:
    """What a starting replica gets: the model's labels and the service's meta (which model,
    signature and precision to load), the learning state's parts its loop phases carry, and the
    committed slot and decision it must serve."""

    labels: tuple[str, ...]
    meta: dict[str, Any]
    parts: dict[str, Any]  # the System's fields but its backend: a replica loads its own
    slot: int
    decision: Decision


@dataclass(frozen=True)
class Instruction:
    """A long poll's answer: ``prepare`` (build ``decision`` on the standby copy), ``commit``
    (serve ``slot`` with ``decision`` now), or ``wait`` (nothing new). ``failure``: the
    controller's boundary failed (the replicas report it on /healthz)."""

    kind: str
    slot: int = -1
    decision: Decision | None = None
    failure: str | None = None


@dataclass
class _Replica:
    seen: float
    slot: int = -1
    prepared: int = -1
    memory_bytes: int = 0
    merge_ms: float = 0.0


@dataclass
class _Pending:
    slot: int
    decision: Decision
    decided: float
    committed: bool = False
    swapped: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Signed:
    """Signatures a replica computed for some of the texts it served: their positions in the
    batch it reports, and the (n, d) signatures."""

    positions: tuple[int, ...]
    signatures: np.ndarray


class SlotController:
    """See the module docstring. Runs as a threaded Ray actor; every method is thread-safe."""

    def __init__(self, config: ServeConfig, *, stale_s: float = 6.0) -> None:
        self.config = config
        self.stale_s = stale_s
        self._lock = threading.Condition()
        self._replicas: dict[str, _Replica] = {}
        self._pending: _Pending | None = None
        self._failure: str | None = None
        self._stopping = False
        self._opened = False
        self._propagation_ms: list[float] = []
        self._model_ms: list[float] = []
        self._boundary_ms: list[float] = []
        self._merge_ms: list[float] = []
        self._slot = 0
        self._slot_opened = time.time()
        self._slot_served = 0
        self._slot_first_request: float | None = None
        self._slot_latency_ms = 0.0
        self._served_total = 0

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> dict[str, Any]:
        """Take the state folder's lock, load the model and the learning state, and start the
        boundary thread; returns the service's meta. Raises
        :class:`~tanbr.serve.state.StateFolderInUseError` when the folder is in use."""
        self._state_lock = StateLock(self.config.state_dir).acquire()
        try:
            replicas = build_replicas(self.config)
            self.store = StateStore(self.config.state_dir)
        except BaseException:
            self._state_lock.release()
            raise
        self.system = replicas.systems[0]
        self.labels = replicas.labels
        self.meta = replicas.meta
        self.policy_name = self.system.mode.name
        scorer = self.system.scorer
        slots = self.config.slots
        self.generative = self.system.backend.kind == "lm"
        # a language model's continuation likelihood needs no truth, whatever the reward kind
        label_free = not scorer.needs_truth or self.generative
        self.shadow = (
            slots.shadow
            if slots.shadow is not None
            else (self.system.labelling.probe if label_free else 0)
        )
        self.ledger = SlotLedger(self.store, policy_name=self.policy_name, meta=self.meta)
        self._texts: list[str] = []
        self._served_labels: list[int] = []
        self._completions: list[Completion] = []  # generations finished since the boundary
        self._signed_texts: list[str] = []  # texts the replicas sent signatures of
        self._signatures: list[np.ndarray] = []  # ... and those signatures, per batch
        snapshot = self.store.load_snapshot()
        if snapshot is None:
            decision = decide(self.system, slot=0)
            self.ledger.open_slot(0, decision, 0.0, 0)
            self._open(0)
            self.ledger.save(0, self.system)
        else:
            slot = self.ledger.load(snapshot, [self.system])
            self._open(slot)
            index = {label: i for i, label in enumerate(self.labels)}
            served = self.store.served(slot)
            self._texts = [text for text, _ in served]
            self._served_labels = [index.get(label, -1) for _, label in served]
        self._served_total = self.store.count_requests()
        self._boundaries = BoundarySchedule(self._lock)
        self._thread = threading.Thread(target=self._boundary_loop, name="tanbr-boundary")
        self._thread.daemon = True
        self._thread.start()
        self._opened = True
        logger.info("controller serves slot %d from %s", self._slot, self.config.state_dir)
        return dict(self.meta)

    def stop(self) -> None:
        """Stop the boundary thread, close the store and release the lock."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if not self._opened:
            return
        self._thread.join(60)
        self.store.close()
        self._state_lock.release()
        self._opened = False

    # --- replicas -------------------------------------------------------------------------

    def hello(self, replica: str) -> Hello:
        """Register a starting replica; it serves the committed slot's decision."""
        with self._lock:
            self._replicas[replica] = _Replica(seen=time.monotonic())
            slot = self._slot
            parts = {
                f.name: getattr(self.system, f.name)
                for f in dataclasses.fields(self.system)
                if f.name not in ("backend", "pending", "applied")
            }
            return Hello(self.labels, dict(self.meta), parts, slot, self.ledger.decisions[slot])

    def sync(self, replica: str, slot: int, prepared: int, timeout: float = 2.0) -> Instruction:
        """A replica's long poll: it serves ``slot`` and has ``prepared`` on its standby copy.
        Returns as soon as there is something to do, else after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            state = self._replicas.setdefault(replica, _Replica(seen=time.monotonic()))
            state.slot, state.prepared = slot, prepared
            while True:
                state.seen = time.monotonic()
                if self._failure is not None:
                    return Instruction("wait", failure=self._failure)
                if self._slot != slot:
                    return Instruction("commit", self._slot, self.ledger.decisions[self._slot])
                pending = self._pending
                if pending is not None and pending.committed and slot != pending.slot:
                    return Instruction("commit", pending.slot, pending.decision)
                if pending is not None and not pending.committed and prepared != pending.slot:
                    return Instruction("prepare", pending.slot, pending.decision)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    return Instruction("wait")
                self._lock.wait(remaining)

    def prepared(self, replica: str, slot: int, merge_ms: float, memory_bytes: int) -> None:
        """A replica built ``slot``'s decision on its standby copy."""
        with self._lock:
            state = self._replicas.setdefault(replica, _Replica(seen=time.monotonic()))
            state.prepared, state.seen = slot, time.monotonic()
            state.merge_ms, state.memory_bytes = merge_ms, memory_bytes
            self._lock.notify_all()

    def swapped(self, replica: str, slot: int) -> None:
        """A replica serves ``slot`` now."""
        with self._lock:
            state = self._replicas.setdefault(replica, _Replica(seen=time.monotonic()))
            state.slot, state.seen = slot, time.monotonic()
            if self._pending is not None and self._pending.slot == slot:
                self._pending.swapped[replica] = time.perf_counter()
            self._lock.notify_all()

    def replicas(self) -> dict[str, int]:
        """Live replicas and the slot each serves."""
        with self._lock:
            now = time.monotonic()
            return {k: r.slot for k, r in self._replicas.items() if now - r.seen < self.stale_s}

    def propagation_ms(self) -> list[float]:
        """Plan-propagation times so far: a decision to its last replica's swap (ms)."""
        with self._lock:
            return list(self._propagation_ms)

    # --- request path ---------------------------------------------------------------------

    def record(
        self,
        rows: Sequence[RequestRow],
        texts: Sequence[str],
        tops: Sequence[int],
        model_ms: float,
        signed: Signed | None = None,
    ) -> None:
        """Served requests, durable before their ids reach the client; a slot closes once it
        has served ``slot_size`` texts. ``signed``: the signatures of some of them, for the
        estimator."""
        self.store.add_requests(rows, texts=texts)
        with self._lock:
            self._served_total += len(rows)
            self._texts.extend(texts)
            if signed is not None and len(signed.positions):
                self._signed_texts.extend(texts[i] for i in signed.positions)
                self._signatures.append(np.asarray(signed.signatures))
            self._served_labels.extend(int(k) for k in tops)
            self._model_ms.append(model_ms)
            del self._model_ms[:-_WINDOW]
            served_now = sum(1 for r in rows if r.slot == self._slot)
            if served_now:
                self._slot_served += served_now
                self._slot_latency_ms += model_ms * served_now / len(rows)
                if self._slot_first_request is None:
                    self._slot_first_request = time.time()
                    self._lock.notify_all()
                if self._slot_served >= self.config.slots.slot_size:
                    self._boundaries.request("count")

    def complete(self, completion: Completion, model_ms: float) -> None:
        """A finished generation, durable before the client's stream ends: it counts for the
        slot that served it, its prompt joins the estimator's history (signed here), and it
        may be sampled for the label-free likelihood reward."""
        row = RequestRow(completion.request_id, completion.slot, completion.text, time.time())
        self.record([row], [completion.prompt], [-1], model_ms)
        with self._lock:
            self._completions.append(completion)

    def feedback(
        self, request_id: str, *, label: str | None = None, reward: float | None = None
    ) -> FeedbackRow:
        """Acknowledge feedback durably; the policy learns it at the next slot boundary."""
        return self.store.add_feedback(request_id, label=label, reward=reward)

    def pending_feedback(self) -> int:
        return self.ledger.pending_feedback()

    def close_slot(self, reason: str = "admin", timeout: float = 300.0) -> tuple[int, int]:
        """Close the current slot now; returns once every live replica serves the next one. The
        feedback acknowledged before this call is learned at that boundary."""
        with self._lock:
            self._check_alive()
            closing = self._slot
            done = self._boundaries.close_now(reason, timeout=timeout, halted=self._halted)
            self._check_alive()
            if not done:
                raise TimeoutError(f"slot {closing} did not close within {timeout} s")
            return closing, self._slot

    def failure(self) -> str | None:
        return self._failure

    def status(self) -> dict[str, Any]:
        """The same view as the single-process service's /v1/status (predict latencies are
        the asking replica's, filled in there)."""
        with self._lock:
            slot = self._slot
            decision = self.ledger.decisions[slot]
            served, opened = self._slot_served, self._slot_opened
            total, merges, updates = self._served_total, self.ledger.merges, self.ledger.updates
            model_ms, merge_ms = list(self._model_ms), list(self._merge_ms)
            boundary_ms = list(self._boundary_ms)
            propagation_ms = list(self._propagation_ms)
            busy = self._boundaries.busy
        plan = decision.plan or {}
        return {
            "slot": slot,
            "slot_requests": served,
            "slot_age_s": round(time.time() - opened, 3),
            "slot_size": self.config.slots.slot_size,
            "slot_seconds": self.config.slots.slot_seconds,
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
            "boundary_busy": busy,
            "latency": {
                "window": 0,
                "predict_p50_ms": None,
                "predict_p99_ms": None,
                "model_p50_ms": _quantile(model_ms, 0.5),
                "merge_p50_ms": _quantile(merge_ms, 0.5),
                "boundary_p50_ms": _quantile(boundary_ms, 0.5),
                "propagation_p50_ms": _quantile(propagation_ms, 0.5),
                "propagation_p99_ms": _quantile(propagation_ms, 0.99),
            },
            "replicas": len(self.replicas()),
        }

    # --- slot boundaries ------------------------------------------------------------------

    def _boundary_loop(self) -> None:
        seconds = self.config.slots.slot_seconds

        def due() -> float | None:
            first = self._slot_first_request
            return None if seconds is None or not first else first + seconds

        def failed(err: Exception) -> None:
            self._failure = f"{type(err).__name__}: {err}"
            self._pending = None

        self._boundaries.run(self._turn, due=due, stopping=lambda: self._stopping, failed=failed)

    def _turn(self, reason: str) -> None:
        t0 = time.perf_counter()
        closing, nxt = self._slot, self._slot + 1
        with self._lock:
            latency_ms = self._slot_latency_ms
            texts, self._texts = self._texts, []
            served_labels, self._served_labels = self._served_labels, []
            completions, self._completions = self._completions, []
            signed_texts, self._signed_texts = self._signed_texts, []
            signatures, self._signatures = self._signatures, []
        # 6-7. reward and policy update from the feedback acknowledged so far
        upto = self.store.last_feedback_seq()
        updates = self.ledger.learn(
            self.system,
            self.store.feedback_after(self.ledger.watermark, upto=upto),
            upto,
            open_slot=closing,
            open_latency_ms=latency_ms,
        )
        row = self.store.slot(closing)
        updates += self.ledger.unlabelled_rewards(
            self.system,  # the controller's copy: the full MoE, never merged
            closing,
            texts=texts,
            labels=served_labels,
            completions=completions,
            size=self.shadow,
            latency_ms=latency_ms,
            memory=row.memory_bytes if row is not None else 0,
            upto=upto,
        )
        # 1-3. the closing slot's texts join the estimator's history; estimate, select, plan
        if self.system.mode.learns:
            self._observe(closing, texts, signed_texts, signatures)
        decision = decide(self.system, slot=nxt)
        # 4. prepare: every live replica builds it on its standby copy
        with self._lock:
            self._pending = _Pending(nxt, decision, time.perf_counter())
            self._lock.notify_all()
            live = self._wait_replicas(lambda r: r.prepared == nxt)
            merge_ms = max((self._replicas[k].merge_ms for k in live), default=0.0)
            memory = max((self._replicas[k].memory_bytes for k in live), default=0)
        # persist: slot history, then the snapshot that commits it all
        self.ledger.close_slot(
            closing, reason=reason, latency_ms=latency_ms, updates=updates, upto=upto
        )
        if decision.kind == "merge":
            self.ledger.merges += 1
            self._merge_ms.append(merge_ms)
        self.ledger.open_slot(nxt, decision, merge_ms, memory)
        self.ledger.save(nxt, self.system)
        # commit: every live replica swaps
        with self._lock:
            pending = self._pending
            assert pending is not None
            pending.committed = True
            self._open(nxt)
            self._lock.notify_all()
            self._wait_replicas(lambda r: r.slot == nxt)
            if pending.swapped:
                self._propagation_ms.append((max(pending.swapped.values()) - pending.decided) * 1e3)
            self._pending = None
            self._boundary_ms.append((time.perf_counter() - t0) * 1e3)
            self._boundaries.finish()
        logger.info("slot %d closed (%s); slot %d serves (%s)", closing, reason, nxt, decision.kind)

    def _wait_replicas(self, done: Any, timeout: float = 120.0) -> list[str]:
        """Wait (holding ``_lock``) until every live replica is ``done``; a replica that stops
        polling is dropped. Returns the live replicas."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            live = [k for k, r in self._replicas.items() if now - r.seen < self.stale_s]
            if all(done(self._replicas[k]) for k in live) or self._stopping:
                return live
            if now >= deadline:
                late = [k for k in live if not done(self._replicas[k])]
                logger.warning("replicas %s did not follow within %.0f s", late, timeout)
                return [k for k in live if k not in late]
            self._lock.wait(0.5)

    def _observe(
        self, slot: int, texts: list[str], signed: list[str], signatures: list[np.ndarray]
    ) -> None:
        """The closing slot joins the estimator's history: the signatures the replicas sent,
        or (none sent: the slot's texts were restored after a restart) computed here."""
        if not signed:
            keep = self._sample(len(texts), slot)
            observe(self.system, Requests(tuple(texts[i] for i in keep)))
            return
        keep = self._sample(len(signed), slot)
        sigs = np.concatenate(signatures, axis=0)[keep]
        observe(self.system, Requests(tuple(signed[i] for i in keep)), signatures=sigs)

    def _sample(self, n: int, slot: int) -> np.ndarray:
        """At most ``observe_max`` of ``n`` positions, uniformly (seeded by the slot)."""
        limit = self.config.slots.observe_max
        if limit == 0 or n <= limit:
            return np.arange(n)
        return np.sort(np.random.default_rng(slot).choice(n, size=limit, replace=False))

    def _open(self, slot: int) -> None:
        self._slot = slot
        self._slot_opened = time.time()
        self._slot_served = self.store.count_requests(slot)
        self._slot_first_request = time.time() if self._slot_served else None
        self._slot_latency_ms = 0.0

    def _halted(self) -> bool:
        return self._failure is not None or self._stopping

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"slot boundary failed: {self._failure}")
        if self._stopping:
            raise RuntimeError("the service is shutting down")


def _floats(x: Any, digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in np.asarray(x, dtype=np.float64).ravel()]


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.quantile(np.asarray(values, dtype=np.float64), q)), 3)
