"""Durable state of the service: what it served, the feedback it acknowledged, its slots.

Two stores with two jobs:

* An SQLite database in WAL mode (``service.sqlite3``) holds the append-only logs: one row per
  served request, one per acknowledged feedback, one per slot. Every write that a client is told
  about is committed before the HTTP answer leaves; in WAL mode a commit is in the log file
  when it returns, so a ``kill -9`` never loses it. Feedback and the slot history are also
  fsynced at commit (``synchronous=FULL``) and survive a power cut; served-request rows (one
  transaction per micro-batch) are not fsynced, to keep the request path short.
* A pickled snapshot (``snapshot.pkl``) holds the learning state (policy and its tree, the
  estimator, the current slot and its decision) at each slot boundary. It is written to a
  temporary file, fsynced and renamed over the old one, so a crash leaves either the old or the
  new snapshot, never a torn one.

The two are tied by a *watermark*: feedback rows are numbered in the order they were
acknowledged (``seq``), and the snapshot records the highest ``seq`` the policy has learned from.
Rows above the watermark are pending; on restart they are learned at the next boundary, exactly
once, whatever the moment of the crash.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

DB_NAME = "service.sqlite3"
SNAPSHOT_NAME = "snapshot.pkl"
SNAPSHOT_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    slot INTEGER NOT NULL,
    label TEXT NOT NULL,
    text TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_slot ON requests (slot);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE REFERENCES requests (request_id),
    slot INTEGER NOT NULL,
    predicted TEXT NOT NULL,
    label TEXT,
    reward REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    slot INTEGER PRIMARY KEY,
    opened REAL NOT NULL,
    closed REAL,
    close_reason TEXT,
    kind TEXT NOT NULL,
    mix TEXT NOT NULL,
    action TEXT,
    plan TEXT,
    merge_ms REAL NOT NULL,
    latency_ms REAL NOT NULL DEFAULT 0,
    memory_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    slot INTEGER NOT NULL,
    reward REAL NOT NULL,
    n_feedback INTEGER NOT NULL,
    watermark INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


class UnknownRequestError(LookupError):
    """Feedback names a request id this service never served."""


class DuplicateFeedbackError(LookupError):
    """Feedback for this request id was already acknowledged."""


@dataclass(frozen=True)
class RequestRow:
    """One served text: the id handed to the client, the slot that served it, its label."""

    request_id: str
    slot: int
    label: str
    created: float


@dataclass(frozen=True)
class FeedbackRow:
    """One acknowledged feedback; ``seq`` orders rows by acknowledgement.

    Exactly one of ``label`` (the true label) and ``reward`` (a reward in [0, 1]) is set.
    """

    seq: int
    request_id: str
    slot: int
    predicted: str
    label: str | None
    reward: float | None
    created: float


@dataclass(frozen=True, kw_only=True)
class SlotRow:
    """A slot's history entry: when it opened and closed (and why), and how it was served.

    ``mix``, ``action`` and ``plan`` are the slot's decision at full precision (late feedback
    for a slot long gone is learned from them); ``latency_ms`` is the time its requests spent
    in the model, ``memory_bytes`` what the served model needs resident.
    """

    slot: int
    opened: float
    kind: str
    mix: tuple[float, ...]
    action: tuple[float, ...] | None = None
    plan: dict[str, tuple[float, ...]] | None = None
    merge_ms: float = 0.0
    closed: float | None = None
    close_reason: str | None = None
    n_requests: int = 0
    latency_ms: float = 0.0
    memory_bytes: int = 0


@dataclass(frozen=True)
class UpdateRow:
    """A policy update made from a batch of feedback for one slot."""

    slot: int
    reward: float
    n_feedback: int
    watermark: int
    created: float


class StateStore:
    """The service's durable state under one folder (see the module docstring).

    Thread-safe: one connection, serialised by a lock (SQLite has a single writer anyway, and
    every statement here is short).
    """

    def __init__(self, folder: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.folder = Path(folder)
        self.durable = durable
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.folder / DB_NAME, check_same_thread=False, isolation_level=None
        )
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ValueError(f"state folder {self.folder}: SQLite refused WAL mode ({mode})")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise ValueError(f"state folder {self.folder}: corrupt database ({err})") from err

    # --- requests -------------------------------------------------------------------------

    def add_requests(self, rows: Sequence[RequestRow], *, texts: Sequence[str]) -> None:
        """Record served requests in one transaction (one fsync per batch, not per text).

        The texts are kept as the estimator's history of the open slot (a restart replays
        them); delete the state folder to forget them.
        """
        if len(rows) != len(texts):
            raise ValueError(f"{len(rows)} request rows but {len(texts)} texts")
        if not rows:
            return
        with self._lock, self._transaction():
            self._conn.executemany(
                "INSERT INTO requests (request_id, slot, label, text, created)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (r.request_id, r.slot, r.label, t, r.created)
                    for r, t in zip(rows, texts, strict=True)
                ],
            )

    def texts(self, slot: int) -> list[str]:
        """The texts a slot served, in the order they were recorded."""
        return [text for text, _ in self.served(slot)]

    def served(self, slot: int) -> list[tuple[str, str]]:
        """(text, served label) of every request of a slot, in the order they were recorded."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT text, label FROM requests WHERE slot = ? ORDER BY rowid", (slot,)
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def get_request(self, request_id: str) -> RequestRow | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT request_id, slot, label, created FROM requests WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        return None if row is None else RequestRow(*row)

    def count_requests(self, slot: int | None = None) -> int:
        with self._lock:
            if slot is None:
                row = self._conn.execute("SELECT COUNT(*) FROM requests").fetchone()
            else:
                row = self._conn.execute(
                    "SELECT COUNT(*) FROM requests WHERE slot = ?", (slot,)
                ).fetchone()
        return int(row[0])

    # --- feedback -------------------------------------------------------------------------

    def add_feedback(
        self, request_id: str, *, label: str | None = None, reward: float | None = None
    ) -> FeedbackRow:
        """Acknowledge feedback for a served request; durable when this returns.

        Raises :class:`UnknownRequestError` for an id never served and
        :class:`DuplicateFeedbackError` when the id already has feedback.
        """
        if (label is None) == (reward is None):
            raise ValueError("feedback needs exactly one of label and reward")
        now = time.time()
        with self._lock, self._transaction(fsync=True):
            served = self._conn.execute(
                "SELECT slot, label FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if served is None:
                raise UnknownRequestError(request_id)
            try:
                cur = self._conn.execute(
                    "INSERT INTO feedback (request_id, slot, predicted, label, reward, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (request_id, served[0], served[1], label, reward, now),
                )
            except sqlite3.IntegrityError as err:
                raise DuplicateFeedbackError(request_id) from err
            seq = cur.lastrowid
        assert seq is not None
        return FeedbackRow(seq, request_id, int(served[0]), served[1], label, reward, now)

    def feedback_after(self, watermark: int, *, upto: int | None = None) -> list[FeedbackRow]:
        """Feedback rows with ``watermark < seq <= upto`` in acknowledgement order."""
        query = (
            "SELECT seq, request_id, slot, predicted, label, reward, created FROM feedback"
            " WHERE seq > ?"
        )
        params: tuple[int, ...] = (watermark,)
        if upto is not None:
            query += " AND seq <= ?"
            params = (watermark, upto)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY seq", params).fetchall()
        return [FeedbackRow(*row) for row in rows]

    def last_feedback_seq(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM feedback").fetchone()
        return int(row[0])

    def count_feedback(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()
        return int(row[0])

    # --- slots and updates ----------------------------------------------------------------

    def open_slot(self, row: SlotRow) -> None:
        """Record a slot's opening (replaces a row left by a boundary that did not finish)."""
        plan = None if row.plan is None else {k: list(v) for k, v in row.plan.items()}
        with self._lock, self._transaction(fsync=True):
            self._conn.execute(
                "INSERT OR REPLACE INTO slots (slot, opened, closed, close_reason, kind, mix,"
                " action, plan, merge_ms, latency_ms, memory_bytes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.slot,
                    row.opened,
                    row.closed,
                    row.close_reason,
                    row.kind,
                    json.dumps(list(row.mix)),
                    None if row.action is None else json.dumps(list(row.action)),
                    None if plan is None else json.dumps(plan),
                    row.merge_ms,
                    row.latency_ms,
                    row.memory_bytes,
                ),
            )

    def close_slot(
        self, slot: int, *, reason: str, latency_ms: float = 0.0, closed: float | None = None
    ) -> None:
        """Mark a slot closed (``reason``: count, time or admin) with its model time."""
        with self._lock, self._transaction(fsync=True):
            self._conn.execute(
                "UPDATE slots SET closed = ?, close_reason = ?, latency_ms = ? WHERE slot = ?",
                (time.time() if closed is None else closed, reason, latency_ms, slot),
            )

    _SLOT_COLUMNS = (
        "s.slot, s.opened, s.kind, s.mix, s.action, s.plan, s.merge_ms, s.closed,"
        " s.close_reason, (SELECT COUNT(*) FROM requests r WHERE r.slot = s.slot),"
        " s.latency_ms, s.memory_bytes"
    )

    def slots(self, *, last: int | None = None) -> list[SlotRow]:
        """Slot history, oldest first (only the ``last`` ones if given)."""
        query = f"SELECT {self._SLOT_COLUMNS} FROM slots s ORDER BY s.slot DESC"
        with self._lock:
            rows = self._conn.execute(
                query + (" LIMIT ?" if last is not None else ""),
                (last,) if last is not None else (),
            ).fetchall()
        return [_slot_row(r) for r in reversed(rows)]

    def slot(self, slot: int) -> SlotRow | None:
        """One slot's history entry, or None if the slot never opened."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {self._SLOT_COLUMNS} FROM slots s WHERE s.slot = ?", (slot,)
            ).fetchone()
        return None if row is None else _slot_row(row)

    def add_updates(self, rows: Iterable[UpdateRow]) -> None:
        with self._lock, self._transaction(fsync=True):
            self._conn.executemany(
                "INSERT INTO updates (slot, reward, n_feedback, watermark, created)"
                " VALUES (?, ?, ?, ?, ?)",
                [(u.slot, u.reward, u.n_feedback, u.watermark, u.created) for u in rows],
            )

    def updates(self) -> list[UpdateRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT slot, reward, n_feedback, watermark, created FROM updates ORDER BY id"
            ).fetchall()
        return [UpdateRow(*row) for row in rows]

    def rollback(self, *, slot: int, watermark: int) -> None:
        """Forget history written after the last snapshot (slot ``slot``, ``watermark``).

        A boundary writes the slot history first and commits with the snapshot's rename; if
        the process died in between, those rows describe a boundary that never happened.
        Requests and feedback are never rolled back: they were acknowledged to clients.
        """
        with self._lock, self._transaction():
            n_slots = self._conn.execute("DELETE FROM slots WHERE slot > ?", (slot,)).rowcount
            self._conn.execute(
                "UPDATE slots SET closed = NULL, close_reason = NULL WHERE slot = ?", (slot,)
            )
            n_updates = self._conn.execute(
                "DELETE FROM updates WHERE watermark > ?", (watermark,)
            ).rowcount
        if n_slots or n_updates:
            logger.info(
                "rolled back an unfinished boundary (%d slot rows, %d update rows)",
                n_slots,
                n_updates,
            )

    # --- snapshot -------------------------------------------------------------------------

    def save_snapshot(self, state: dict[str, Any]) -> None:
        """Pickle ``state`` atomically: write a temporary file, fsync, rename, fsync the folder."""
        payload = pickle.dumps(
            {"format": SNAPSHOT_FORMAT, "state": state}, protocol=pickle.HIGHEST_PROTOCOL
        )
        final = self.folder / SNAPSHOT_NAME
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.folder)

    def load_snapshot(self) -> dict[str, Any] | None:
        """The last snapshot, or None on a fresh folder; a corrupt one raises ValueError."""
        return read_snapshot(self.folder)

    # --- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _transaction(self, *, fsync: bool = False) -> _Transaction:
        """A write transaction; ``fsync`` makes its commit durable against a power cut too."""
        return _Transaction(self._conn, full=fsync and self.durable)


LOCK_NAME = "serve.lock"


class StateFolderInUseError(ValueError):
    """Another process serves from this state folder (two writers would overwrite each other)."""


class StateLock:
    """An exclusive lock on a state folder for the life of the process that serves from it.

    ``fcntl.flock`` on ``serve.lock`` (it holds the owner's pid, for the error message): the
    kernel drops it when the process dies, so a crash never leaves a stale lock. Within one
    process the lock is re-entrant (the command line takes it before loading the model, the app
    again when it starts).
    """

    _held: ClassVar[dict[Path, tuple[int, Any]]] = {}  # folder -> (holders, open file)
    _guard = threading.Lock()

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).resolve()

    def acquire(self) -> StateLock:
        import fcntl

        with self._guard:
            count, handle = self._held.get(self.folder, (0, None))
            if count:
                self._held[self.folder] = (count + 1, handle)
                return self
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / LOCK_NAME
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the lock's life)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise StateFolderInUseError(
                    f"state folder {self.folder} is in use by another tanbr serve (pid {owner});"
                    " stop it or give another --state-dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self._held[self.folder] = (1, handle)
            return self

    def release(self) -> None:
        with self._guard:
            count, handle = self._held.get(self.folder, (0, None))
            if count > 1:
                self._held[self.folder] = (count - 1, handle)
            elif count == 1:
                del self._held[self.folder]
                handle.close()  # closing the file drops the flock

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _slot_row(r: Sequence[Any]) -> SlotRow:
    plan = None if r[5] is None else {k: tuple(v) for k, v in json.loads(r[5]).items()}
    return SlotRow(
        slot=int(r[0]),
        opened=r[1],
        kind=r[2],
        mix=tuple(json.loads(r[3])),
        action=None if r[4] is None else tuple(json.loads(r[4])),
        plan=plan,
        merge_ms=r[6],
        closed=r[7],
        close_reason=r[8],
        n_requests=int(r[9]),
        latency_ms=r[10],
        memory_bytes=int(r[11]),
    )


def read_snapshot(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last snapshot in ``folder``, or None if there is none; corrupt: ValueError.

    The state folder is the service's own storage: only point it at folders you trust, as
    unpickling runs code named in the file.
    """
    path = Path(folder) / SNAPSHOT_NAME
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
    except Exception as err:  # pickle raises many types on corrupt input
        raise ValueError(f"corrupt snapshot {path}: {err}") from err
    if not isinstance(blob, dict) or blob.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"snapshot {path} has an unknown format; remove it to start afresh")
    state = blob["state"]
    if not isinstance(state, dict):
        raise ValueError(f"snapshot {path} does not hold a state dict")
    return state


class _Transaction:
    """BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error) on an autocommit connection.

    In WAL mode every commit is appended to the log before it returns, so it survives the
    process being killed; ``full`` also fsyncs the log (``synchronous=FULL``) so that it
    survives the machine losing power.
    """

    def __init__(self, conn: sqlite3.Connection, *, full: bool) -> None:
        self._conn = conn
        self._full = full

    def __enter__(self) -> None:
        if self._full:
            self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            if self._full:
                self._conn.execute("PRAGMA synchronous=NORMAL")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
