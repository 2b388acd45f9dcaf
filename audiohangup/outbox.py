# -*- test-case-name: tests.test_webhook_outbox -*-
"""
The webhook outbox: every undelivered webhook event, one row per event and
receiver, in a SQLite file of its own, so that a crash or a restart loses none.

L{audiohangup.webhooks.Webhooks} adds a row before the event's first attempt,
deletes it once the event is done with (delivered, rejected, or dropped at
the bound), and at start-up reads back what an earlier run left, in the order
it was written. While running, it also takes over (adopts) the rows another
process on the same file left behind: see L{Outbox.orphans}. Delivery is therefore at least once: a crash between an
answer and its delete sends that event again, with the same C{event_id}.

Why a file of its own, not a table in the call records: the records can be
off (C{--call-records none}) while webhooks are on; their schema, queries and
pruning are theirs; and one damaged file does not take the other with it.

As in L{audiohangup.records}, every statement runs on one thread of a
C{ThreadPool(1, 1)} of our own, on one connection only that thread uses, in
the order the reactor asked for them (first in, first out): the reactor never
waits on SQLite. WAL with C{synchronous=NORMAL}: a committed row survives a
crash of the process (SIGKILL included). The file is created 0600: a body
holds a live call id. A receiver is stored as the SHA-256 of its URL, never
the URL, which may carry a token in its query string.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from audiohangup.records import check_writable, create_private

__all__ = ["DEFAULT_MAX", "FILE_NAME", "SCHEMA_VERSION", "Outbox", "Stored", "receiver_key"]

#: Events (one per event and receiver) the outbox holds at most, by default: about 1 KiB of memory each.
DEFAULT_MAX = 50000

#: The outbox's file name beside the call records, when --webhook-outbox is not given.
FILE_NAME = "webhook-outbox.sqlite3"

#: Seconds a statement waits for another connection's lock ("database is locked").
BUSY_TIMEOUT = 5.0

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    receiver    TEXT NOT NULL,
    call_id     TEXT NOT NULL,
    event       TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    body        BLOB NOT NULL,
    created_at  REAL NOT NULL
)
"""


def receiver_key(url: str) -> str:
    """What a row names its receiver by: the SHA-256 of the URL, so no token in a URL is kept at rest."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


class Stored(NamedTuple):
    """One undelivered event for one receiver, as an earlier run left it."""

    rowid: int
    receiver: str
    call_id: str
    event: str
    event_id: str
    body: bytes
    created_at: float


class Outbox:
    """
    The SQLite side of the outbox, and the one thread it runs on. Every
    method but L{check_path} returns a Deferred that fires (or fails with the
    C{sqlite3} error) once the statement has run; nothing here logs: the
    webhooks log each failure once, named.

    @param path: the SQLite file, created if missing.
    @param max_events: the bound the webhooks keep it to.
    """

    def __init__(self, path: str, reactor: Any, *, max_events: int = DEFAULT_MAX,
                 busy_timeout: float = BUSY_TIMEOUT) -> None:
        if max_events < 1:
            raise ValueError("the webhook outbox must hold at least one event")
        self.path = path
        self.reactor = reactor
        self.max_events = max_events
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._pool = ThreadPool(1, 1, name="audiohangup-outbox")
        self._closing: Deferred[None] | None = None

    @staticmethod
    def check_path(path: str) -> None:
        """
        Raise a ValueError naming why the outbox cannot live at C{path}: its
        directory is missing or not writable (SQLite writes its journal
        there), or the path is not a file this process can read and write.
        A file that is there but not a good database is found at start-up:
        logged, and the webhooks go on in memory, as the calls do.
        """
        check_writable(path)

    def _run(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not self._pool.started:
            self._pool.start()
        return deferToThreadPool(self.reactor, self._pool, work, *args)

    # The reactor's side

    def open(self) -> Deferred[list[Stored]]:
        """Open (or create) the file; fires with every row left, oldest first."""
        return self._run(self._open)

    def add(self, receiver: str, call_id: str, event: str, event_id: str, body: bytes, created_at: float) -> Deferred[int]:
        """Store one event for one receiver; fires with its row id."""
        return self._run(self._add, (receiver, call_id, event, event_id, body, created_at))

    def orphans(self, receivers: list[str], before: float, mine: frozenset[int], limit: int) -> Deferred[list[Stored]]:
        """
        Fires with at most C{limit} rows for these receivers written before
        C{before} and not in C{mine}, oldest first: what another process on
        this file left, or is slow to deliver.
        """
        return self._run(self._orphans, receivers, before, mine, limit)

    def delete(self, rowids: list[int]) -> Deferred[int]:
        """Forget these rows (delivered, rejected or dropped); fires with how many went."""
        return self._run(self._delete, rowids)

    def close(self) -> Deferred[None]:
        """Run what is queued, close the file and stop the thread. Safe to call twice."""
        if self._closing is not None:
            return self._closing
        if not self._pool.started:
            self._closing = succeed(None)
            return self._closing
        closing: Deferred[None] = self._run(self._close)

        def stopped(result: object) -> object:
            self._pool.stop()  # its one thread is idle: the close was the last job
            return result

        self._closing = closing.addBoth(stopped)
        return self._closing

    # The writer thread's side

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the webhook outbox is not open")
        return self._conn

    def _open(self) -> list[Stored]:
        create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version}, newer than this audiohangup's ({SCHEMA_VERSION})"
                )
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            rows = conn.execute(
                "SELECT id, receiver, call_id, event, event_id, body, created_at FROM webhook_outbox ORDER BY id"
            ).fetchall()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return [Stored(row[0], row[1], row[2], row[3], row[4], bytes(row[5]), float(row[6])) for row in rows]

    def _add(self, values: tuple[Any, ...]) -> int:
        cursor = self._connection().execute(
            "INSERT INTO webhook_outbox (receiver, call_id, event, event_id, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            values,
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _orphans(self, receivers: list[str], before: float, mine: frozenset[int], limit: int) -> list[Stored]:
        found: list[Stored] = []
        if not receivers or limit < 1:
            return found
        cursor = self._connection().execute(
            "SELECT id, receiver, call_id, event, event_id, body, created_at FROM webhook_outbox"
            f" WHERE created_at < ? AND receiver IN ({', '.join('?' * len(receivers))}) ORDER BY id",
            (before, *receivers),
        )
        try:
            for row in cursor:
                if row[0] not in mine:
                    found.append(Stored(row[0], row[1], row[2], row[3], row[4], bytes(row[5]), float(row[6])))
                    if len(found) >= limit:
                        break
        finally:
            cursor.close()
        return found

    def _delete(self, rowids: list[int]) -> int:
        conn = self._connection()
        if len(rowids) == 1:
            return conn.execute("DELETE FROM webhook_outbox WHERE id = ?", (rowids[0],)).rowcount
        conn.execute("BEGIN")
        try:
            gone = conn.executemany("DELETE FROM webhook_outbox WHERE id = ?", [(rowid,) for rowid in rowids]).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return gone

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

