"""The durable, bounded, ordered spool of audit records waiting for the repository.

Owns `AuditSpool`: one SQLite database (`audit-spool.sqlite`, WAL) in the spool directory,
shared by every worker process of a gateway. `append()` commits a record with a full fsync
before it returns (a record the gateway has accepted survives a crash or restart);
`oldest()` reads the records in the order they were appended; `remove()` deletes one record
once it has been written to the repository. The spool is bounded by a record count and a byte
total: `append()` refuses (returns False) when it is full, and the caller says so loudly.

`SenderLock` is the one-sender-at-a-time rule: of all processes sharing the folder, only
the holder of an exclusive `flock` on `sender.lock` drains the spool, so records leave in the
order they arrived; the kernel releases the lock when the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

DB_NAME = "audit-spool.sqlite"
LOCK_NAME = "sender.lock"

_PROCESS_WRITE_LOCK = threading.Lock()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (one, records, bytes) VALUES (1, 0, 0);
"""


class _Pending:
    __slots__ = ("done", "error", "payload", "result")

    def __init__(self, payload: bytes):
        self.payload = payload
        self.done = False
        self.result = False
        self.error: BaseException | None = None


class AuditSpool:
    """Records on disk, oldest first; safe to share between threads and processes."""

    def __init__(self, directory: Path, *, max_records: int = 100_000,
                 max_bytes: int = 256 * 1024 * 1024):
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # records name patients
        self.path = self.directory / DB_NAME
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._local = threading.local()
        self._pending: list[_Pending] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        db = self._db()
        with self._setup_lock():
            db.executescript(_SCHEMA)  # idempotent; executescript commits itself

    @contextlib.contextmanager
    def _setup_lock(self) -> Iterator[None]:
        """An exclusive lock, across processes, for setting the database up."""
        fd = os.open(self.directory / "setup.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                 check_same_thread=True)
            # Switching a new database to WAL takes an exclusive lock that SQLite's busy
            # handler does not wait for: worker processes starting together would fail with
            # "database is locked". They take turns on a file lock for it instead.
            with self._setup_lock():
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # every commit reaches the disk
            self._local.db = db
            self._local.pid = os.getpid()
        return db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # Threads of one process queue on a lock rather than in SQLite's busy handler, which
        # sleeps in steps of milliseconds; only other processes meet the handler.
        with _PROCESS_WRITE_LOCK:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def append(self, payload: bytes) -> bool:
        """Store `payload` durably (committed and fsync'd when this returns); False
        (nothing stored) when the spool is full.

        Group commit: while one thread of the process commits, the records other threads
        bring meanwhile queue up, and the next of them commits them all in one transaction
        with one fsync."""
        mine = _Pending(payload)
        with self._pending_lock:
            self._pending.append(mine)
        with self._commit_lock:
            if not mine.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    results = self._append_batch([p.payload for p in batch])
                except BaseException as exc:
                    for p in batch:
                        p.error, p.done = exc, True
                    raise
                for p, ok in zip(batch, results, strict=True):
                    p.result, p.done = ok, True
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _append_batch(self, payloads: list[bytes]) -> list[bool]:
        results = []
        with self._transaction() as db:
            records, size = db.execute("SELECT records, bytes FROM totals").fetchone()
            added = added_bytes = 0
            for payload in payloads:
                if (records + added + 1 > self.max_records
                        or size + added_bytes + len(payload) > self.max_bytes):
                    results.append(False)
                    continue
                db.execute("INSERT INTO records (payload) VALUES (?)", (payload,))
                added += 1
                added_bytes += len(payload)
                results.append(True)
            if added:
                db.execute("UPDATE totals SET records = records + ?, bytes = bytes + ?",
                           (added, added_bytes))
        return results

    def oldest(self, limit: int = 64) -> list[tuple[int, bytes]]:
        rows = self._db().execute(
            "SELECT id, payload FROM records ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [(int(i), bytes(p)) for i, p in rows]

    def after(self, record_id: int, limit: int = 64) -> list[tuple[int, bytes]]:
        """The records appended after `record_id`, oldest first."""
        rows = self._db().execute(
            "SELECT id, payload FROM records WHERE id > ? ORDER BY id LIMIT ?",
            (record_id, limit)).fetchall()
        return [(int(i), bytes(p)) for i, p in rows]

    def remove_many(self, record_ids: list[int]) -> None:
        """Records written to the repository leave the spool (one transaction)."""
        if not record_ids:
            return
        with self._transaction() as db:
            for record_id in record_ids:
                row = db.execute("SELECT length(payload) FROM records WHERE id = ?",
                                 (record_id,)).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM records WHERE id = ?", (record_id,))
                db.execute("UPDATE totals SET records = records - 1, bytes = bytes - ?",
                           (int(row[0]),))

    def remove(self, record_id: int) -> None:
        """The record was written to the repository: it leaves the spool."""
        with self._transaction() as db:
            row = db.execute("SELECT length(payload) FROM records WHERE id = ?",
                             (record_id,)).fetchone()
            if row is None:
                return
            db.execute("DELETE FROM records WHERE id = ?", (record_id,))
            db.execute("UPDATE totals SET records = records - 1, bytes = bytes - ?",
                       (int(row[0]),))

    def relax_durability_of_removals(self) -> None:
        """For the sender thread's connection: removals commit without fsync (WAL,
        synchronous=NORMAL). A power loss may then bring back a record already sent (sent
        twice), never lose one."""
        self._db().execute("PRAGMA synchronous=NORMAL")

    def count(self) -> int:
        return int(self._db().execute("SELECT records FROM totals").fetchone()[0])

    def size(self) -> int:
        return int(self._db().execute("SELECT bytes FROM totals").fetchone()[0])

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class SenderLock:
    """An exclusive, non-blocking flock on the spool folder's sender.lock."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self._fh: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def try_acquire(self) -> bool:
        if self._fh is not None:
            return True
        fh = open(self.path, "ab")  # kept open while the lock is held
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            finally:
                fh.close()
