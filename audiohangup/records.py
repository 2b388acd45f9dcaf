# -*- test-case-name: tests.test_records -*-
"""
Call records: every leg, one row in SQLite.

A row is written when the leg's UUID arrives (call id, role, peer, start time)
and completed when the leg ends (end time, close reason, hangup cause, frames
and bytes both ways, DTMF digits, milliseconds from our hangup to the close).
A crash therefore loses nothing: at start-up, L{CallRecords.open} closes the
rows an earlier run left open with the reason C{server_lost}, their end time
being the time of that recovery (the real end is unknown).

One writer thread
-----------------
Every statement runs on one thread of a L{ThreadPool}C{(1, 1)} of our own,
through L{deferToThreadPool}, on one C{sqlite3} connection that only that
thread uses. The pool's queue is first in, first out, so writes land in the
order the reactor made them, and a query sees every write queued before it.
L{twisted.enterprise.adbapi} was not used: it would give the same single
thread, but it logs failed rollbacks and reconnections itself (as failures,
with tracebacks), and here every failure must be ours to log, once, as one
line with the call id.

Queries run on that thread too, behind the writes. The store is a service:
C{startService} opens it, C{stopService} closes it. If nobody closes it, the
store closes itself in the reactor's C{during shutdown} phase, after the
service's drain, writing what is queued first.

The reactor only snapshots the leg's fields and queues the work: a slow,
full or failing disk delays or loses records, never a call. A failed write is
logged at error level with the call id, without a traceback, and counted with
C{audiohangup_call_records_failed_total}; a written one in
C{audiohangup_call_records_written_total}. Writes queue in memory while the
disk stalls.

Each row is keyed, at C{legStarted}, by a L{_Row} handle kept per leg; the
writer thread fills in its SQLite rowid when the insert runs. The end of the
leg updates that row, even if the insert is still queued (it runs first, on
the same thread). If the insert failed, or the row is gone, the end inserts
the complete row instead, so one transient failure loses nothing.

Durability: the database is in WAL mode with C{synchronous=NORMAL}. A
committed row survives a crash of the process (SIGKILL included); only a
crash of the whole machine may lose the last commits.

Schema
------
The schema version is SQLite's C{PRAGMA user_version}. L{MIGRATIONS} lists,
for each version, the statements that bring the previous one up to it; a new
database runs them all, so a fresh database and an upgraded one are the same.
Version 1 recorded no DTMF digits and no hangup-to-close time; version 2 adds
both (C{NULL}, "not recorded", in rows written by version 1). A database of a
newer version than this code knows is refused.

Counters (frames, bytes, DTMF) are C{NULL} until the leg ends: a live row, or
one closed as C{server_lost}, does not know them.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import os
import re
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from audiohangup.events import LegObserver, counts_as_leg
from audiohangup.interfaces import ILegObserver
from audiohangup.lifecycle import DAY, Daily, Once
from audiohangup.logs import iso_time
from audiohangup.metrics import series
from audiohangup.reasons import CloseReason, Role

if TYPE_CHECKING:
    from audiohangup.interfaces import IServerLeg
    from audiohangup.reasons import HangupCause

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SERVER_LOST",
    "BadQuery",
    "CallRecords",
    "SchemaTooNew",
    "create_private",
]

#: The close reason of a row its leg never completed: the server went away.
SERVER_LOST = "server_lost"

#: The records a query answers when not told, and the most it answers.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500

#: Seconds between two scheduled prunes; one runs in L{CallRecords.open} too.
PRUNE_INTERVAL = DAY

#: Seconds a statement waits for another connection's lock ("database is locked").
BUSY_TIMEOUT = 5.0

#: The first bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"

#: For each version, the statements that bring the version before it up to it.
MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """
        CREATE TABLE call_records (
            id          INTEGER PRIMARY KEY,
            call_id     TEXT NOT NULL,
            role        TEXT NOT NULL,
            peer        TEXT NOT NULL,
            started_at  REAL NOT NULL,
            ended_at    REAL,
            reason      TEXT,
            cause       TEXT,
            frames_in   INTEGER,
            frames_out  INTEGER,
            bytes_in    INTEGER,
            bytes_out   INTEGER
        )
        """,
        "CREATE INDEX call_records_started_at ON call_records (started_at)",
        "CREATE INDEX call_records_call_id ON call_records (call_id)",
    ),
    2: (
        "ALTER TABLE call_records ADD COLUMN dtmf TEXT",
        "ALTER TABLE call_records ADD COLUMN hangup_to_close_ms REAL",
        "CREATE INDEX call_records_open ON call_records (id) WHERE ended_at IS NULL",
    ),
    # The leg's media streams, a JSON list of {stream_id, url, protocol, mode, outcome}.
    3: ("ALTER TABLE call_records ADD COLUMN streams TEXT",),
    # The call's recording, relative to the recordings directory (YYYY-MM-DD/<call id>.wav).
    4: ("ALTER TABLE call_records ADD COLUMN recording TEXT",),
}
SCHEMA_VERSION = max(MIGRATIONS)

_ROLES = frozenset(role.value for role in Role)
_REASONS = frozenset({reason.value for reason in CloseReason} | {SERVER_LOST})
_COLUMNS = (
    "id, call_id, role, peer, started_at, ended_at, reason, cause, "
    "frames_in, frames_out, bytes_in, bytes_out, dtmf, hangup_to_close_ms, streams, recording"
)
_END_FIELDS = (
    "ended_at", "reason", "cause", "frames_in", "frames_out", "bytes_in", "bytes_out", "dtmf", "hangup_to_close_ms",
    "streams", "recording",
)
_MAX_ROWID = 2**63 - 1
_CURSOR = re.compile(r"(?P<started_at>[0-9eE.+-]+):(?P<id>[0-9]{1,19})")


class BadQuery(ValueError):
    """A query's parameter is malformed: a cursor, a limit, a role, a reason, a time."""


class SchemaTooNew(RuntimeError):
    """The database was written by a newer audiohangup, with a schema this one does not know."""


class _State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Row:
    """One leg's row: its SQLite rowid, known once the writer thread has inserted it."""

    __slots__ = ("rowid",)

    def __init__(self) -> None:
        self.rowid: int | None = None


@implementer(ILegObserver)
class CallRecords(Service, LegObserver):
    """
    The call records store: observes legs and answers queries.

    Start the service (or call L{open}) before the first leg starts, and stop
    it (or L{close}) once the last is gone: a write asked for before C{open}
    or after C{close} is not made (it is logged and counted as failed).

    @param path: the SQLite file (created if missing), or C{":memory:"}.
    @param reactor: provides C{IReactorTime} and C{IReactorThreads}; if it
        provides C{IReactorCore} too, the store closes itself when the
        reactor shuts down, in case nobody else did (see L{_reactorShutdown}).
    @param keep_days: rows whose leg started longer ago than this are pruned,
        in L{open} and then daily; C{0} keeps every row.
    @param metrics: where each leg write is counted, written or failed.
    """

    log = Logger()
    name = "records"

    @staticmethod
    def check_path(path: str) -> None:
        """
        Raise a ValueError naming why the store cannot live at C{path}: its
        directory is missing or not writable (SQLite writes its journal there),
        or the file is there and not writable, or not a SQLite database (the
        store would open it, fail, and run without records). Start-up fails
        closed on it.
        """
        if path == ":memory:":
            return
        check_writable(path)
        if os.path.exists(path):
            try:
                with open(path, "rb") as file:
                    head = file.read(len(SQLITE_HEADER))
            except OSError as error:
                raise ValueError(f"{path} cannot be read: {error.strerror or error}") from None
            if head and head != SQLITE_HEADER:  # 0 bytes is an empty database to SQLite
                raise ValueError(f"{path} is not a SQLite database")

    @staticmethod
    def counters(metrics: CollectorRegistry) -> tuple[Counter, Counter]:
        """The store's series in C{metrics}, written and failed: shown (at 0) even with the store off."""
        return (
            series(metrics, Counter, "audiohangup_call_records_written", "Call record writes that succeeded."),
            series(metrics, Counter, "audiohangup_call_records_failed", "Call record writes that failed."),
        )

    def __init__(
        self, path: str, reactor: Any, *, keep_days: float = 30.0, metrics: CollectorRegistry | None = None
    ) -> None:
        if not (isinstance(keep_days, (int, float)) and keep_days >= 0 and math.isfinite(keep_days)):
            raise ValueError(f"keep_days must be a finite number of days, 0 or more, not {keep_days!r}")
        self.path = path
        self.reactor = reactor
        self.keep_days = float(keep_days)
        metrics = metrics if metrics is not None else CollectorRegistry()  # none given: counted for nobody
        self.written, self.failed = self.counters(metrics)
        self._db = _Database(path)
        self._pool = ThreadPool(1, 1, name="audiohangup-records")
        self._state = _State.NEW
        self._rows: dict[Any, _Row] = {}
        self._pruning: Daily | None = None
        self._trigger: Any = None
        self._closed = Once()
        self._opening: Deferred[None] | None = None

    # Life cycle

    def startService(self) -> None:
        """
        Open the store. Before the reactor runs, so no leg can start ahead of
        it: the writes of the first legs queue behind the opening. A store
        that cannot open is logged and off; the calls go on without it.
        """
        super().startService()
        self._opening = Deferred.fromCoroutine(self.open()).addCallbacks(lambda _: None, self._openFailed)

    def _openFailed(self, failure: Failure) -> None:
        # A failing disk must not stop the calls: log it and serve without records.
        self.log.error(
            "call records in {path} are off: {error}", path=self.path,
            error=failure.getErrorMessage() or type(failure.value).__name__,
        )

    def stopService(self) -> Deferred[None]:
        """Close the store once its opening is done: a stop right after the start lets it finish first."""
        super().stopService()
        opening, self._opening = self._opening, None
        if opening is None:
            return self.close()
        return opening.addCallback(lambda _: self.close())

    async def open(self) -> int:
        """
        Open the database: create or upgrade its schema, close the rows an
        earlier run left open (reason C{server_lost}, C{ended_at} the time of
        this recovery, counters unknown), prune old rows, and schedule a daily
        prune.

        Legs may start as soon as C{open} is called: their writes queue
        behind it. If it fails, the store is closed and the error raised
        (a L{SchemaTooNew}, or the C{sqlite3} error).

        @return: how many rows were recovered as C{server_lost}.
        """
        if self._state is not _State.NEW:
            raise RuntimeError(f"CallRecords.open() on a store that is {self._state.value}")
        self._state = _State.OPENING
        self._pool.start()
        now = self.reactor.seconds()
        try:
            opened: tuple[str, int | None, int, int] = await self._run(self._db.open, now, self._cutoff(now))
        except BaseException:
            await self.close()
            raise
        if self._state is not _State.OPENING:
            raise RuntimeError("the call records store was closed while it opened")
        self._state = _State.OPEN
        journal, upgraded_from, recovered, pruned = opened
        if upgraded_from is None:
            upgrade = ""
        elif upgraded_from == 0:
            upgrade = ", created"
        else:
            upgrade = f", upgraded from version {upgraded_from}"
        self.log.info(
            "call records in {path} (schema version {version}{upgrade})",
            path=self.path, version=SCHEMA_VERSION, upgrade=upgrade,
        )
        if journal != "wal" and self.path != ":memory:":
            self.log.warn("call records in {path}: journal mode is {journal}, not wal", path=self.path, journal=journal)
        self._warnIfShared()
        if recovered:
            self.log.info(
                "{count} call records left open by an earlier run closed as server_lost", count=recovered
            )
        self._logPruned(pruned)
        if self.keep_days:
            self._pruning = Daily(self._scheduledPrune, self.reactor, PRUNE_INTERVAL)
            self._pruning.startService()
        if IReactorCore.providedBy(self.reactor):
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._reactorShutdown)
        return recovered

    def _warnIfShared(self) -> None:
        """A store an earlier version (or the operator) left open to others is kept so, but said once."""
        try:
            mode = os.stat(self.path).st_mode & 0o777
        except OSError:
            return  # ":memory:", or gone: nothing to say
        if mode & 0o077:
            self.log.warn(
                "call records in {path} are mode {mode:04o}: others can read live call ids; chmod 600 it",
                path=self.path, mode=mode,
            )

    def close(self) -> Deferred[None]:
        """
        Let every queued write and query finish, then close the database and
        stop the writer thread. Safe to call twice, and before L{open}.

        Call it once the legs are gone (after the service's drain): a leg
        ending later is not recorded (logged and counted as failed), and
        legs still live keep their rows open, for the next L{open} to close
        as C{server_lost}.
        """
        waiter = self._closed.wait()
        if self._state is _State.CLOSED or self._state is _State.CLOSING:
            return waiter
        started = self._state is not _State.NEW
        self._beginClosing()
        if started:
            self._run(self._db.close).addBoth(self._stopped)
        else:
            self._stopped(None)
        return waiter

    def _beginClosing(self) -> None:
        self._state = _State.CLOSING
        if self._pruning is not None and self._pruning.running:
            self._pruning.stopService()
        self._pruning = None
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            self.reactor.removeSystemEventTrigger(trigger)

    def _stopped(self, result: object) -> None:
        if isinstance(result, Failure):
            self.log.error("closing the call records in {path} failed: {error}", path=self.path, error=_text(result))
        if self._state is _State.CLOSED:
            return  # the reactor's shutdown got there first
        if self._pool.started:
            self._pool.stop()  # its one thread is idle: this job was the last
        self._state = _State.CLOSED
        self._rows.clear()
        self._closed.fire()

    def _reactorShutdown(self) -> None:
        """
        The reactor is shutting down and nobody closed the store: finish the
        queued writes and close, synchronously, as C{adbapi} does. This runs
        in the C{during} phase, after the C{before} phase in which the
        service hangs up and drains its legs, so their ends are written; a
        C{before} trigger would run alongside that drain and lose them.
        """
        self._trigger = None  # it fired: removing it now would warn
        if self._state is _State.CLOSED:
            return
        if self._state is not _State.CLOSING:
            self._beginClosing()
        if self._pool.started:
            errors: list[BaseException] = []

            def closeDatabase() -> None:
                try:
                    self._db.close()
                except BaseException as error:
                    errors.append(error)

            self._pool.callInThread(closeDatabase)
            self._pool.stop()  # runs what is queued, then joins the thread
            if errors:
                self._stopped(Failure(errors[0]))
                return
        self._stopped(None)

    # ILegObserver: each snapshots the leg now and queues the write.

    def legStarted(self, leg: IServerLeg) -> None:
        row = self._rows[leg] = _Row()
        values = {
            "call_id": leg.call_id,
            "role": str(leg.role),
            "peer": str(leg.peer),
            "started_at": float(leg.connected_at),
        }
        self._write(leg, "start", self._db.start, row, values)

    def hangupSent(self, leg: IServerLeg, cause: HangupCause) -> None:
        """Record the cause at once: a row lost mid-hangup keeps it."""
        row = self._rows.get(leg)
        if row is not None:
            self._write(leg, "hangup", self._db.hangup, row, str(cause))

    def legEnded(self, leg: IServerLeg) -> None:
        row = self._rows.pop(leg, None) or _Row()
        ended_at = leg.ended_at if leg.ended_at is not None else self.reactor.seconds()
        values = {
            "call_id": leg.call_id,
            "role": str(leg.role),
            "peer": str(leg.peer),
            "started_at": float(leg.connected_at),
            "ended_at": float(ended_at),
            "reason": None if leg.close_reason is None else str(leg.close_reason),
            "cause": None if leg.hangup_cause is None else str(leg.hangup_cause),
            "frames_in": int(leg.frames_in),
            "frames_out": int(leg.frames_out),
            "bytes_in": int(leg.bytes_in),
            "bytes_out": int(leg.bytes_out),
            "dtmf": str(leg.dtmf),
            "hangup_to_close_ms": leg.hangup_to_close_ms,
            "streams": json.dumps([stream.record() for stream in leg.streams]) if leg.streams else None,
            "recording": leg.recording,
        }
        self._write(leg, "end", self._db.end, row, values)

    def connectionEnded(self, connection: IServerLeg) -> None:
        """
        A connection without a UUID has no record (no call id); one refused
        as a duplicate has one, with its reason: it named a live call.
        """
        if counts_as_leg(connection):
            self.legEnded(connection)

    def _write(self, leg: Any, what: str, work: Callable[..., None], *args: Any) -> None:
        call_id, role = getattr(leg, "call_id", None) or "-", getattr(leg, "role", "-")
        if self._state is _State.OPENING or self._state is _State.OPEN:
            self._run(work, *args).addBoth(self._written, call_id, role, what)
        else:
            reason = "not open yet" if self._state is _State.NEW else "closed"
            self._written(Failure(RuntimeError(f"the call records store is {reason}")), call_id, role, what)

    def _written(self, result: object, call_id: str, role: object, what: str) -> None:
        """Count one leg write; log a failed one, once, with its call id. Never raises."""
        try:
            if isinstance(result, Failure):
                self.log.error(
                    "{call_id} {role} call record not written ({what}): {error}",
                    call_id=call_id, role=role, what=what, error=_text(result),
                )
                self.failed.inc()
            else:
                self.written.inc()
        except Exception:
            self.log.failure("{call_id} {role} counting a call record write failed", call_id=call_id, role=role)

    def _run(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self._pool, work, *args)

    # Pruning

    def _cutoff(self, now: float) -> float | None:
        return now - self.keep_days * 86400 if self.keep_days else None

    def prune(self) -> Deferred[int]:
        """
        Delete the rows whose leg started more than C{keep_days} ago.

        @return: fires with how many rows went (0 when C{keep_days} is 0), or
            fails with the C{sqlite3} error; a store not open raises
            C{RuntimeError}.
        """
        self._checkOpen()
        cutoff = self._cutoff(self.reactor.seconds())
        if cutoff is None:
            return succeed(0)
        pruned: Deferred[int] = self._run(self._db.prune, cutoff)
        return pruned.addCallback(self._logPruned)

    def _logPruned(self, count: int) -> int:
        if count:
            self.log.info(
                "{count} call records older than {days:g} days pruned", count=count, days=self.keep_days
            )
        return count

    def _scheduledPrune(self) -> Deferred[None]:
        def failed(failure: Failure) -> None:
            self.log.error("pruning the call records in {path} failed: {error}", path=self.path, error=_text(failure))

        if self._state is not _State.OPEN:
            return succeed(None)
        return self.prune().addCallbacks(lambda _: None, failed)

    # Queries

    def query(
        self,
        *,
        call_id: str | None = None,
        role: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        One page of records, newest first by (start time, row id).

        @param call_id: only this call's legs (exact match).
        @param role: only this role (a L{Role} or its value).
        @param reason: only this close reason (a L{CloseReason}, its value, or
            C{"server_lost"}).
        @param since: only legs started at or after this Unix time.
        @param until: only legs started before this Unix time.
        @param limit: at most this many records, 1 to L{MAX_LIMIT}.
        @param cursor: the C{next_cursor} of the page before; C{None} or C{""}
            for the first page.
        @return: fires with C{{"records": [...], "next_cursor": str | None}};
            each record has C{call_id}, C{role}, C{peer}, C{started_at} and
            C{ended_at} (ISO 8601 UTC with milliseconds; C{ended_at} is
            C{None} for a live leg), C{reason}, C{cause}, C{frames_in},
            C{frames_out}, C{bytes_in}, C{bytes_out}, C{dtmf} and
            C{hangup_to_close_ms}.
        @raise BadQuery: at once, for a malformed parameter or cursor.
        @raise RuntimeError: at once, if the store is not open.
        """
        where: list[str] = []
        params: list[Any] = []
        _by_call(call_id, where, params)
        if role is not None:
            if not isinstance(role, str) or role not in _ROLES:
                raise BadQuery(f"unknown role {role!r}")
            where.append("role = ?")
            params.append(str(role))
        if reason is not None:
            if not isinstance(reason, str) or reason not in _REASONS:
                raise BadQuery(f"unknown reason {reason!r}")
            where.append("reason = ?")
            params.append(str(reason))
        if since is not None:
            where.append("started_at >= ?")
            params.append(_time(since, "since"))
        if until is not None:
            where.append("started_at < ?")
            params.append(_time(until, "until"))
        _check_limit(limit)
        if cursor:
            after_started_at, after_id = _decode_cursor(cursor)
            where.append("(started_at < ? OR (started_at = ? AND id < ?))")
            params.extend((after_started_at, after_started_at, after_id))
        self._checkOpen()
        sql = (
            f"SELECT {_COLUMNS} FROM call_records"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY started_at DESC, id DESC LIMIT ?"
        )
        params.append(limit + 1)
        return self._run(self._db.select, sql, params).addCallback(_page, limit)

    def recordings(
        self, *, call_id: str | None = None, limit: int = DEFAULT_LIMIT, cursor: str | None = None
    ) -> Deferred[dict[str, Any]]:
        """
        One page of the calls' recordings, newest first: each file once
        (its call's legs all name it), with its call id, the start of its
        first leg and the end of its last (C{None} while one is live).

        @return: fires with C{{"recordings": [...], "next_cursor": str | None}}.
        @raise BadQuery: at once, for a malformed limit or cursor.
        @raise RuntimeError: at once, if the store is not open.
        """
        where = ["recording IS NOT NULL"]
        params: list[Any] = []
        _by_call(call_id, where, params)
        _check_limit(limit)
        having = ""
        if cursor:
            after_started_at, after_id = _decode_cursor(cursor)
            having = " HAVING (MIN(started_at) < ? OR (MIN(started_at) = ? AND MIN(id) < ?))"
            params.extend((after_started_at, after_started_at, after_id))
        self._checkOpen()
        # A live leg's NULL ended_at makes the file's end unknown: MAX() would skip it.
        sql = (
            "SELECT MIN(id), call_id, recording, MIN(started_at),"
            " CASE WHEN COUNT(ended_at) = COUNT(*) THEN MAX(ended_at) END"
            f" FROM call_records WHERE {' AND '.join(where)} GROUP BY recording{having}"
            " ORDER BY MIN(started_at) DESC, MIN(id) DESC LIMIT ?"
        )
        params.append(limit + 1)
        return self._run(self._db.select, sql, params).addCallback(_recordings_page, limit)

    def _checkOpen(self) -> None:
        if self._state is not _State.OPENING and self._state is not _State.OPEN:
            raise RuntimeError(f"the call records store is {self._state.value}")


def _by_call(call_id: object, where: list[str], params: list[Any]) -> None:
    """Only the legs of C{call_id}, if one is given (exact match)."""
    if call_id is not None:
        if not isinstance(call_id, str):
            raise BadQuery(f"call_id must be a string, not {call_id!r}")
        where.append("call_id = ?")
        params.append(call_id)


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"limit must be an integer from 1 to {MAX_LIMIT}, not {limit!r}")


def _time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadQuery(f"{name} must be a Unix time in seconds, not {value!r}")
    return float(value)


def _encode_cursor(started_at: float, rowid: int) -> str:
    return base64.urlsafe_b64encode(f"{started_at!r}:{rowid}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        text = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode("ascii")
        match = _CURSOR.fullmatch(text)
        if match is None:
            raise ValueError(text)
        started_at, rowid = float(match["started_at"]), int(match["id"])
        if not math.isfinite(started_at) or rowid > _MAX_ROWID:
            raise ValueError(text)
        return started_at, rowid
    except (TypeError, ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery(f"malformed cursor {cursor!r}") from None


def _page(rows: list[tuple[Any, ...]], limit: int) -> dict[str, Any]:
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = _encode_cursor(last[4], last[0])
    return {"records": [_record(row) for row in rows], "next_cursor": next_cursor}


def _recordings_page(rows: list[tuple[Any, ...]], limit: int) -> dict[str, Any]:
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1][3], rows[-1][0])
    recordings = [
        {
            "call_id": call_id, "file": file, "started_at": iso_time(started_at),
            "ended_at": None if ended_at is None else iso_time(ended_at),
        }
        for _, call_id, file, started_at, ended_at in rows
    ]
    return {"recordings": recordings, "next_cursor": next_cursor}


def _record(row: tuple[Any, ...]) -> dict[str, Any]:
    (_, call_id, role, peer, started_at, ended_at, reason, cause,
     frames_in, frames_out, bytes_in, bytes_out, dtmf, hangup_to_close_ms, streams, recording) = row
    return {
        "call_id": call_id,
        "role": role,
        "peer": peer,
        "started_at": iso_time(started_at),
        "ended_at": None if ended_at is None else iso_time(ended_at),
        "reason": reason,
        "cause": cause,
        "frames_in": frames_in,
        "frames_out": frames_out,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "dtmf": dtmf,
        "hangup_to_close_ms": hangup_to_close_ms,
        "streams": json.loads(streams) if streams else [],
        "recording": recording,
    }


def _text(failure: Failure) -> str:
    error = failure.value
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class _Database:
    """The SQLite side. Every method runs on the writer thread, never on the reactor."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.ProgrammingError("the call records database is not open")
        return self.conn

    def open(self, now: float, cutoff: float | None) -> tuple[str, int | None, int, int]:
        """
        Connect, switch to WAL, migrate, recover and prune.

        @return: the journal mode, the version upgraded from (C{None} if
            none was needed), the rows recovered and the rows pruned.
        """
        if self.path != ":memory:":
            create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        try:
            journal = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            conn.execute("PRAGMA synchronous = NORMAL")
            upgraded_from = _migrate(conn)
            recovered = conn.execute(
                "UPDATE call_records SET ended_at = ?, reason = ? WHERE ended_at IS NULL", (now, SERVER_LOST)
            ).rowcount
            pruned = 0 if cutoff is None else _prune(conn, cutoff)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return journal, upgraded_from, recovered, pruned

    def start(self, row: _Row, values: dict[str, Any]) -> None:
        cursor = self._connection().execute(
            "INSERT INTO call_records (call_id, role, peer, started_at) "
            "VALUES (:call_id, :role, :peer, :started_at)",
            values,
        )
        row.rowid = cursor.lastrowid

    def hangup(self, row: _Row, cause: str) -> None:
        conn = self._connection()
        if row.rowid is not None:  # else the start failed: the end writes the whole row
            conn.execute("UPDATE call_records SET cause = ? WHERE id = ?", (cause, row.rowid))

    def end(self, row: _Row, values: dict[str, Any]) -> None:
        conn = self._connection()
        if row.rowid is not None:
            assignments = ", ".join(f"{name} = :{name}" for name in _END_FIELDS)
            updated = conn.execute(
                f"UPDATE call_records SET {assignments} WHERE id = :id", dict(values, id=row.rowid)
            ).rowcount
            if updated:
                return
        # The start failed, was never seen, or its row was pruned: write it whole.
        names = ("call_id", "role", "peer", "started_at") + _END_FIELDS
        cursor = conn.execute(
            f"INSERT INTO call_records ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)})", values
        )
        row.rowid = cursor.lastrowid

    def prune(self, cutoff: float) -> int:
        return _prune(self._connection(), cutoff)

    def select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._connection().execute(sql, params).fetchall()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


def check_writable(path: str) -> None:
    """
    Raise a ValueError naming why a SQLite file cannot live at C{path}: its
    directory is missing or not writable (SQLite writes its journal there),
    or the path is not a file this process can read and write.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the directory {folder} is not writable")
    if os.path.exists(path) and not (os.path.isfile(path) and os.access(path, os.R_OK | os.W_OK)):
        raise ValueError(f"{path} is not a file this process can read and write")


def create_private(path: str) -> None:
    """
    Create the database file 0600 whatever the umask, unless it exists:
    SQLite gives its C{-wal} and C{-shm} the main file's mode, and the rows
    hold live call ids, which let a local user join a call.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return  # an existing store keeps the mode its owner gave it
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits off 0600, never added them
    finally:
        os.close(fd)


def _prune(conn: sqlite3.Connection, cutoff: float) -> int:
    return conn.execute("DELETE FROM call_records WHERE started_at < ?", (cutoff,)).rowcount


def _migrate(conn: sqlite3.Connection) -> int | None:
    """Bring the schema to L{SCHEMA_VERSION}; return the version it had, or C{None} if it was current."""

    def version() -> int:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the call records database has schema version {found}; "
                f"this audiohangup knows versions up to {SCHEMA_VERSION}"
            )
        return found

    if version() == SCHEMA_VERSION:
        return None
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = version()  # again, under the write lock: another process may have upgraded it
        for target in range(before + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return None if before == SCHEMA_VERSION else before
