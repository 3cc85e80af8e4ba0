"""Micro-batching of predict calls, for the single-process service and each Ray Serve replica.

Predict calls queue their texts; one inference thread takes whatever is queued (up to
``max_batch`` texts, waiting up to ``wait_ms`` for more) and serves it in one forward. Batching
the backlog of concurrent clients is what lets a 2-core box keep up with many. A call whose
texts make the model fail fails alone: the batch is served again call by call.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


class ServiceBusyError(RuntimeError):
    """The request queue is full: the service is overloaded (a 503, not a client error)."""


@dataclass(frozen=True)
class Answer:
    """What a predict call gets back for one text."""

    request_id: str
    slot: int
    label: str
    probs: np.ndarray  # (n_labels,)


@dataclass
class Job:
    """One predict call: its texts, and the future its answers go to."""

    texts: list[str]
    future: concurrent.futures.Future[list[Answer]]


class MicroBatcher:
    """The queue and the inference thread; ``serve(jobs)`` answers every job it is given."""

    def __init__(
        self,
        serve: Callable[[list[Job]], None],
        *,
        max_batch: int,
        max_queue: int,
        wait_ms: float = 0.0,
    ) -> None:
        self._serve = serve
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.wait_s = wait_ms / 1000.0
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tanbr-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Answer what is queued and stop the thread; False if it is still running."""
        self._stopping = True
        self._queue.put(None)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future[list[Answer]]:
        """Queue texts for the next micro-batch; the future resolves to one answer per text."""
        if self._stopping:
            raise ServiceBusyError("the service is shutting down")
        job = Job(list(texts), concurrent.futures.Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServiceBusyError(
                f"request queue is full ({self.max_queue} calls waiting)"
            ) from None
        return job.future

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.texts)
            deadline = time.monotonic() + self.wait_s
            while n < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # keep the stop marker for the outer loop
                    break
                jobs.append(nxt)
                n += len(nxt.texts)
            try:
                self._serve(jobs)
            except Exception as err:
                # one call's texts must not fail the others batched with it: serve each alone
                if len(jobs) == 1:
                    self._fail(jobs[0], err)
                    continue
                for j in jobs:
                    try:
                        self._serve([j])
                    except Exception as alone:
                        self._fail(j, alone)

    @staticmethod
    def _fail(job: Job, err: Exception) -> None:
        """An overloaded or stopping service says so (503); anything else is the model's."""
        if isinstance(err, ServiceBusyError):
            failure: Exception = err
        else:
            logger.exception("serving %d texts failed", len(job.texts))
            failure = RuntimeError("the model failed on this request")
        if not job.future.done():
            job.future.set_exception(failure)
