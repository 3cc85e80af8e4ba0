"""The slot-boundary handshake: an admin close is never absorbed by a boundary already running."""

from __future__ import annotations

import threading
import time

from tanbr.serve.boundaries import BoundarySchedule


def _take(s: BoundarySchedule, due: float | None = None) -> str | None:
    return s.take(due=lambda: due, stopping=lambda: False)


def test_admin_close_during_a_running_boundary_waits_for_the_next_one() -> None:
    lock = threading.Condition()
    s = BoundarySchedule(lock)
    with lock:
        s.request("count")
        assert _take(s) == "count"  # boundary 1 runs; its feedback watermark is taken
        ticket = s.request_fresh("admin")
        s.finish()
        assert not s.done(ticket)  # boundary 1 started before the admin request
        assert _take(s) == "admin"
        s.finish()
        assert s.done(ticket)


def test_triggers_while_one_is_due_or_running_add_nothing() -> None:
    lock = threading.Condition()
    s = BoundarySchedule(lock)
    with lock:
        assert not s.busy
        s.request("count")
        assert s.busy  # due
        s.request("time")
        assert _take(s) == "count"
        s.request("count")  # the slot that triggered it is the one closing
        assert s.busy  # running
        s.finish()
        assert s.started == s.finished == 1
        assert not s.busy
        ticket = s.request_fresh("admin")  # nothing running: the next boundary is fresh
        assert _take(s) == "admin"
        s.finish()
        assert s.done(ticket)


def test_a_due_slot_age_closes_by_time_and_stopping_ends_the_wait() -> None:
    lock = threading.Condition()
    s = BoundarySchedule(lock)
    with lock:
        assert _take(s, due=time.time() - 1) == "time"
        s.finish()
    stop = threading.Event()
    got: list[str | None] = []

    def loop() -> None:
        with lock:
            got.append(s.take(due=lambda: None, stopping=stop.is_set))

    t = threading.Thread(target=loop)
    t.start()
    time.sleep(0.05)
    with lock:
        stop.set()
        lock.notify_all()
    t.join(5)
    assert got == [None]
