"""When the next slot boundary runs: the handshake between the request threads, the admin
endpoint and the one boundary thread, shared by the single-process service and the Ray
controller.

A count or time trigger asks for *a* boundary: while one is requested or running, another
trigger adds nothing (the slot that triggered it is the one being closed). An admin close asks
for a boundary that *starts after* the request, so the feedback acknowledged before it is
learned: when a boundary is already running (its feedback watermark was taken earlier), a
second one is queued behind it, and the caller waits for that one by its ticket.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class BoundarySchedule:
    """Every method is called with ``lock`` held (the owner's condition variable)."""

    def __init__(self, lock: threading.Condition) -> None:
        self._lock = lock
        self._reason: str | None = None  # a boundary is due, for this reason
        self._queued: str | None = None  # another one is due after the running one
        self._running = False
        self.started = 0
        self.finished = 0

    def request(self, reason: str) -> None:
        """A count or time trigger: a boundary soon, unless one is due or running already."""
        if self._reason is None:
            self._reason = reason
            self._lock.notify_all()

    def request_fresh(self, reason: str) -> int:
        """A boundary that starts after this call; returns its ticket for :meth:`done`."""
        if self._running:
            if self._queued is None:
                self._queued = reason
        else:
            self.request(reason)
        return self.started + 1

    @property
    def busy(self) -> bool:
        """A boundary is due or running (a measurement of the resting service waits for it)."""
        return self._running or self._reason is not None

    def done(self, ticket: int) -> bool:
        return self.finished >= ticket

    def close_now(self, reason: str, *, timeout: float, halted: Callable[[], bool]) -> bool:
        """An admin close: ask for a fresh boundary and wait (releasing the lock) until it has
        committed, or ``halted`` (the boundaries failed, the owner stops); False on timeout."""
        ticket = self.request_fresh(reason)
        return self._lock.wait_for(lambda: self.done(ticket) or halted(), timeout)

    def take(self, *, due: Callable[[], float | None], stopping: Callable[[], bool]) -> str | None:
        """Block (releasing the lock) until a boundary is due, mark it running and return its
        reason; ``None`` when the owner stops. ``due`` gives the wall-clock time at which the
        current slot closes by age, if any."""
        while self._reason is None and not stopping():
            at = due()
            if at is not None and at <= time.time():
                self._reason = "time"
                break
            self._lock.wait(None if at is None else at - time.time())
        if stopping():
            return None
        assert self._reason is not None
        self._running = True
        self.started += 1
        return self._reason

    def run(
        self,
        turn: Callable[[str], None],
        *,
        due: Callable[[], float | None],
        stopping: Callable[[], bool],
        failed: Callable[[Exception], None],
    ) -> None:
        """The boundary thread: take each boundary as it falls due and ``turn`` it, until the
        owner stops. A boundary that raises stops the thread (the current slot keeps serving);
        ``failed`` records why, called with the lock held."""
        while True:
            with self._lock:
                reason = self.take(due=due, stopping=stopping)
            if reason is None:
                return
            try:
                turn(reason)
            except Exception as err:
                logger.exception("slot boundary failed; the current slot keeps serving")
                with self._lock:
                    failed(err)
                    self._lock.notify_all()
                return

    def finish(self) -> None:
        """The running boundary has committed the next slot."""
        self._running = False
        self.finished += 1
        self._reason, self._queued = self._queued, None
        self._lock.notify_all()
