"""The service's durable state: SQLite logs in WAL mode and the atomic snapshot."""

from __future__ import annotations

import pickle
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tanbr.serve.state import (
    DB_NAME,
    SNAPSHOT_NAME,
    DuplicateFeedbackError,
    RequestRow,
    SlotRow,
    StateStore,
    UnknownRequestError,
    UpdateRow,
)


def _serve(store: StateStore, ids: list[str], slot: int) -> None:
    rows = [RequestRow(i, slot, "t:a", 1.0) for i in ids]
    store.add_requests(rows, texts=[f"text {i}" for i in ids])


def _slot(slot: int) -> SlotRow:
    return SlotRow(
        slot=slot,
        opened=1.0,
        kind="merge",
        mix=(0.5, 0.5),
        action=(0.3, 0.7),
        plan={"layers.0.mlp": (0.25, 0.75)},
        merge_ms=2.0,
        memory_bytes=1234,
    )


def test_wal_mode_and_tables(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"requests", "feedback", "slots", "updates"} <= tables


def test_feedback_for_served_requests_only_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    _serve(store, ["a", "b"], slot=3)
    row = store.add_feedback("a", label="t:a")
    assert (row.seq, row.slot, row.predicted, row.label, row.reward) == (1, 3, "t:a", "t:a", None)
    assert store.add_feedback("b", reward=0.25).seq == 2
    with pytest.raises(UnknownRequestError):
        store.add_feedback("nope", label="t:a")
    with pytest.raises(DuplicateFeedbackError):
        store.add_feedback("a", reward=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        store.add_feedback("b")
    assert store.count_feedback() == 2
    assert [r.request_id for r in store.feedback_after(0)] == ["a", "b"]
    assert [r.request_id for r in store.feedback_after(1)] == ["b"]
    assert [r.request_id for r in store.feedback_after(0, upto=1)] == ["a"]
    assert store.last_feedback_seq() == 2


def test_requests_texts_and_counts(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    _serve(store, ["x", "y"], slot=0)
    _serve(store, ["z"], slot=1)
    assert store.count_requests() == 3
    assert store.count_requests(0) == 2
    assert store.texts(0) == ["text x", "text y"]
    assert store.get_request("z") == RequestRow("z", 1, "t:a", 1.0)
    assert store.get_request("w") is None
    with pytest.raises(ValueError, match="texts"):
        store.add_requests([RequestRow("q", 0, "t:a", 1.0)], texts=[])


def test_slot_history_and_rollback(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for s in range(3):
        store.open_slot(_slot(s))
    _serve(store, ["a", "b"], slot=1)
    store.close_slot(1, reason="count", latency_ms=12.5)
    store.close_slot(2, reason="time")
    store.add_updates([UpdateRow(0, 0.5, 4, 7, 1.0), UpdateRow(1, 0.9, 2, 9, 1.0)])
    history = store.slots()
    assert [h.slot for h in history] == [0, 1, 2]
    assert history[1].n_requests == 2 and history[1].close_reason == "count"
    assert history[1].mix == (0.5, 0.5) and history[1].action == (0.3, 0.7)
    assert history[1].plan == {"layers.0.mlp": (0.25, 0.75)}
    assert history[1].latency_ms == 12.5 and history[1].memory_bytes == 1234
    assert store.slot(1) == history[1] and store.slot(9) is None
    assert [h.slot for h in store.slots(last=2)] == [1, 2]
    # a boundary into slot 2 that never reached its snapshot (watermark stayed at 7)
    store.rollback(slot=1, watermark=7)
    assert [h.slot for h in store.slots()] == [0, 1]
    assert store.slots()[1].closed is None
    assert [u.slot for u in store.updates()] == [0]


def test_snapshot_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load_snapshot() is None
    store.save_snapshot({"slot": 4, "obj": [1, 2, 3]})
    store.save_snapshot({"slot": 5, "obj": [4]})
    assert store.load_snapshot() == {"slot": 5, "obj": [4]}
    assert sorted(p.name for p in tmp_path.iterdir() if "snapshot" in p.name) == [SNAPSHOT_NAME]


def test_corrupt_snapshot_and_database_are_named(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    (tmp_path / SNAPSHOT_NAME).write_bytes(b"\x80\x05garbage")
    with pytest.raises(ValueError, match="corrupt snapshot"):
        store.load_snapshot()
    (tmp_path / SNAPSHOT_NAME).write_bytes(pickle.dumps({"format": 99}))
    with pytest.raises(ValueError, match="unknown format"):
        store.load_snapshot()
    store.close()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="corrupt database"):
        StateStore(bad)


def test_acknowledged_feedback_survives_kill(tmp_path: Path) -> None:
    """A child process acknowledges feedback, then dies by SIGKILL: every row is there."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from tanbr.serve.state import RequestRow, StateStore
        store = StateStore({str(tmp_path)!r})
        ids = [f"r{{i}}" for i in range(50)]
        store.add_requests([RequestRow(i, 0, "t:a", 0.0) for i in ids], texts=ids)
        for i in ids:
            store.add_feedback(i, label="t:a")
            print(i, flush=True)  # acknowledged
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9
    acknowledged = proc.stdout.split()
    assert len(acknowledged) == 50
    store = StateStore(tmp_path)
    assert {r.request_id for r in store.feedback_after(0)} == set(acknowledged)


def test_one_serving_process_per_state_folder(tmp_path: Path) -> None:
    """The lock is the kernel's: another process is refused, the same process may re-enter,
    and a released (or dead) holder frees the folder."""
    import subprocess
    import sys

    from tanbr.serve.state import StateFolderInUseError, StateLock

    probe = (
        "import sys\n"
        "from tanbr.serve.state import StateLock, StateFolderInUseError\n"
        "try:\n"
        f"    StateLock({str(tmp_path)!r}).acquire()\n"
        "except StateFolderInUseError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    with StateLock(tmp_path):
        with StateLock(tmp_path):  # re-entrant within the process
            pass
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert other.returncode == 3
        assert "in use by another tanbr serve" in other.stdout and str(tmp_path) in other.stdout
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
    assert issubclass(StateFolderInUseError, ValueError)  # the command line says it in one line
