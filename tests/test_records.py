"""
Call records in SQLite: one row per leg, written when its UUID arrives and
completed when it ends, recovered as server_lost after a crash, upgraded from
an older schema, paged newest first, pruned, and never in a call's way (a
failing or stalled disk is logged and counted, and the reactor never waits).

Legs are real L{AudioSocketProtocol}s on L{StringTransport}s with a L{Clock}
(their times are that clock's), told to the store through a L{Registry}; the
store runs its SQLite thread on the real reactor, with a fresh database in
C{tmp_path}.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from audiohangup.audio import LegSettings
from audiohangup.logs import iso_time
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.records import SCHEMA_VERSION, SERVER_LOST, BadQuery, CallRecords, SchemaTooNew
from audiohangup.registry import Registry
from audiohangup.wire import HANGUP_FRAME, Kind, encode_frame, encode_uuid
from tests.conftest import LogCapture, until

DAY = 86400.0
AUDIO = encode_frame(Kind.SLIN, b"\x01\x02" * 160)
DTMF_42 = encode_frame(Kind.DTMF, b"4") + encode_frame(Kind.DTMF, b"2")

#: The v1 schema as an older audiohangup created it: no dtmf, no hangup_to_close_ms.
SCHEMA_V1 = """
CREATE TABLE call_records (
    id INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL,
    role TEXT NOT NULL,
    peer TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    reason TEXT,
    cause TEXT,
    frames_in INTEGER,
    frames_out INTEGER,
    bytes_in INTEGER,
    bytes_out INTEGER
);
CREATE INDEX call_records_started_at ON call_records (started_at);
CREATE INDEX call_records_call_id ON call_records (call_id);
PRAGMA user_version = 1;
"""


class Counts:
    """The store's record writes, read from the metrics it counts them in."""

    def __init__(self) -> None:
        self.metrics = CollectorRegistry()

    @property
    def written(self) -> int:
        return int(self.metrics.get_sample_value("audiohangup_call_records_written_total") or 0)

    @property
    def failed(self) -> int:
        return int(self.metrics.get_sample_value("audiohangup_call_records_failed_total") or 0)


class ThreadedClock(Clock):
    """A Clock for the store's timers (recovery time, daily prune), real threads for its writes."""

    def __init__(self, now: float) -> None:
        super().__init__()
        self.advance(now)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        reactor.callFromThread(f, *args, **kwargs)


class Line:
    """Legs on StringTransports, on their own Clock, whose events go to the store."""

    def __init__(self, store: CallRecords, now: float | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(time.time() - 3600 if now is None else now)
        self.registry = Registry()
        self.registry.events.add(store)
        self.settings = LegSettings(close_timeout=2.0, uuid_timeout=5.0)
        self.pacer = Pacer(self.clock)
        self.port = 40000

    def connect(self, role: Role = Role.VISITOR) -> AudioSocketProtocol:
        self.port += 1
        leg = AudioSocketProtocol(role, self.registry, self.settings, self.clock, self.pacer)
        leg.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", self.port)))
        return leg

    def live(self, role: Role = Role.VISITOR, call_id: uuid.UUID | None = None) -> AudioSocketProtocol:
        leg = self.connect(role)
        leg.dataReceived(encode_uuid(call_id or uuid.uuid4()))
        assert leg.live
        return leg

    def ended(
        self, role: Role = Role.VISITOR, call_id: uuid.UUID | None = None, hangup: bool = False
    ) -> AudioSocketProtocol:
        """A leg that starts and ends at once: peer_closed, or hangup_clean after our hangup."""
        leg = self.live(role, call_id)
        if hangup:
            leg.hangup(HangupCause.API)
        leg.connectionLost(Failure(ConnectionDone()))
        return leg


@asynccontextmanager
async def opened(path: Path, reactor_: Any = reactor, **options: Any) -> AsyncIterator[CallRecords]:
    store = CallRecords(str(path), reactor_, **options)
    try:
        await store.open()
        yield store
    finally:
        await store.close()


def expected(leg: AudioSocketProtocol) -> dict[str, Any]:
    """The record of an ended leg, from the leg's own attributes."""
    assert leg.ended_at is not None and leg.close_reason is not None
    return {
        "call_id": leg.call_id,
        "role": leg.role.value,
        "peer": leg.peer,
        "started_at": iso_time(leg.connected_at),
        "ended_at": iso_time(leg.ended_at),
        "reason": leg.close_reason.value,
        "cause": None if leg.hangup_cause is None else leg.hangup_cause.value,
        "frames_in": leg.frames_in,
        "frames_out": leg.frames_out,
        "bytes_in": leg.bytes_in,
        "bytes_out": leg.bytes_out,
        "dtmf": leg.dtmf,
        "hangup_to_close_ms": (
            None if leg.hangup_at is None else round((leg.ended_at - leg.hangup_at) * 1000, 1)
        ),
        "streams": [stream.record() for stream in leg.streams],
        "recording": leg.recording,
    }


async def everything(store: CallRecords, **filters: Any) -> list[dict[str, Any]]:
    """Every record matching the filters, walking the pages."""
    records: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await store.query(cursor=cursor, limit=500, **filters)
        records += page["records"]
        cursor = page["next_cursor"]
        if cursor is None:
            return records


def errors(logs: LogCapture) -> list[dict[str, Any]]:
    return [e for e in logs.events if e.get("log_level") is LogLevel.error]


# How a live leg ends: what to do to it, and the reason and cause it must end with.

def _hangup_then(cause: HangupCause, loss: type[Exception]) -> Callable[[Line, AudioSocketProtocol], None]:
    def end(line: Line, leg: AudioSocketProtocol) -> None:
        leg.hangup(cause)
        line.clock.advance(0.0123)
        leg.connectionLost(Failure(loss()))

    return end


def _hangup_timeout(line: Line, leg: AudioSocketProtocol) -> None:
    leg.hangup(HangupCause.IDLE_TIMEOUT)
    line.clock.advance(line.settings.close_timeout)
    assert leg.transport.disconnected  # aborted
    leg.connectionLost(Failure(ConnectionAborted()))


def _peer_sends_then_closes(data: bytes) -> Callable[[Line, AudioSocketProtocol], None]:
    def end(line: Line, leg: AudioSocketProtocol) -> None:
        leg.dataReceived(data)
        assert leg.transport.disconnecting
        leg.connectionLost(Failure(ConnectionDone()))

    return end


def _peer_goes(loss: type[Exception]) -> Callable[[Line, AudioSocketProtocol], None]:
    def end(line: Line, leg: AudioSocketProtocol) -> None:
        leg.connectionLost(Failure(loss()))

    return end


ENDINGS = [
    ("hangup_clean", "api", 12.3, _hangup_then(HangupCause.API, ConnectionDone)),
    ("hangup_reset", "shutdown", 12.3, _hangup_then(HangupCause.SHUTDOWN, ConnectionLost)),
    ("hangup_timeout", "idle_timeout", 2000.0, _hangup_timeout),
    ("peer_closed", None, None, _peer_goes(ConnectionDone)),
    ("peer_reset", None, None, _peer_goes(ConnectionLost)),
    ("peer_hangup", None, None, _peer_sends_then_closes(HANGUP_FRAME)),
    ("peer_error", None, None, _peer_sends_then_closes(encode_frame(Kind.ERROR, b"\x01"))),
    ("protocol_error", None, None, _peer_sends_then_closes(encode_uuid(uuid.uuid4()))),
]


@pytest.mark.parametrize("reason, cause, hangup_to_close_ms, end", ENDINGS, ids=[e[0] for e in ENDINGS])
@pytest_twisted.ensureDeferred
async def test_record_per_ending(
    tmp_path: Path, logs: LogCapture, reason: str, cause: str | None, hangup_to_close_ms: float | None,
    end: Callable[[Line, AudioSocketProtocol], None],
) -> None:
    """Each way a started leg ends gives one complete record with its reason and cause."""
    counts = Counts()
    async with opened(tmp_path / "records.db", metrics=counts.metrics) as store:
        line = Line(store)
        leg = line.live(Role.RESIDENT)
        leg.dataReceived(AUDIO * 3 + DTMF_42)
        line.clock.pump([0.02] * 5)  # the pacer sends silence: frames out
        end(line, leg)
        assert leg.close_reason == reason
        [record] = (await store.query())["records"]
        assert record == expected(leg)
        assert record["reason"] == reason
        assert record["cause"] == cause
        assert record["hangup_to_close_ms"] == hangup_to_close_ms
        assert record["dtmf"] == "42"
        assert record["role"] == "resident"
        assert record["peer"] == "127.0.0.1:40001"
        assert record["frames_in"] >= 6 and record["bytes_in"] >= 19 + 3 * len(AUDIO) + 8
        assert record["frames_out"] >= 4 and record["bytes_out"] >= 4 * len(AUDIO)
        assert record["started_at"].endswith("+00:00") and len(record["started_at"]) == len("2025-01-01T00:00:00.000+00:00")
    assert counts.failed == 0
    assert counts.written == (3 if cause else 2)  # start, (hangup,) end
    assert errors(logs) == []


@pytest_twisted.ensureDeferred
async def test_internal_error_is_recorded(tmp_path: Path) -> None:
    """A leg lost to an unexpected failure is recorded as internal_error (its traceback is the leg's log)."""
    async with opened(tmp_path / "records.db") as store:
        line = Line(store)
        leg = line.live()
        leg.connectionLost(Failure(RuntimeError("a bug")))
        [record] = (await store.query())["records"]
        assert record == expected(leg)
        assert record["reason"] == "internal_error"


@pytest_twisted.ensureDeferred
async def test_connection_without_uuid_is_not_recorded(tmp_path: Path, logs: LogCapture) -> None:
    """
    No UUID, no leg, no record: a UUID timeout, a close before or inside the
    UUID, and a first frame that is not a UUID (protocol_error before start).
    """
    counts = Counts()
    async with opened(tmp_path / "records.db", metrics=counts.metrics) as store:
        line = Line(store)
        timed_out = line.connect()
        line.clock.advance(line.settings.uuid_timeout)
        timed_out.connectionLost(Failure(ConnectionDone()))
        assert timed_out.close_reason is CloseReason.UUID_TIMEOUT
        for data, reason in (
            (b"", CloseReason.PEER_CLOSED),
            (encode_uuid(uuid.uuid4())[:7], CloseReason.PEER_CLOSED),
            (AUDIO, CloseReason.PROTOCOL_ERROR),
        ):
            leg = line.connect()
            leg.dataReceived(data)
            leg.connectionLost(Failure(ConnectionDone()))
            assert leg.close_reason is reason
        assert (await store.query()) == {"records": [], "next_cursor": None}
    assert (counts.written, counts.failed) == (0, 0)
    assert errors(logs) == []


@pytest_twisted.ensureDeferred
async def test_row_exists_while_the_leg_is_live(tmp_path: Path, logs: LogCapture) -> None:
    """The row is there from the UUID on: open, then its cause as soon as we hang up, then complete."""
    async with opened(tmp_path / "records.db") as store:
        line = Line(store)
        leg = line.live()
        [record] = (await store.query())["records"]
        assert record == {
            "call_id": leg.call_id,
            "role": "visitor",
            "peer": "127.0.0.1:40001",
            "started_at": iso_time(leg.connected_at),
            "ended_at": None,
            "reason": None,
            "cause": None,
            "frames_in": None,
            "frames_out": None,
            "bytes_in": None,
            "bytes_out": None,
            "dtmf": None,
            "hangup_to_close_ms": None,
            "streams": [],
            "recording": None,
        }
        line.clock.advance(1)
        leg.hangup(HangupCause.API)
        [record] = (await store.query())["records"]
        assert (record["ended_at"], record["reason"], record["cause"]) == (None, None, "api")
        line.clock.advance(0.001)
        leg.connectionLost(Failure(ConnectionLost()))
        [record] = (await store.query())["records"]
        assert record == expected(leg)
        assert record["reason"] == "hangup_reset"
        assert record["hangup_to_close_ms"] == 1.0


@pytest_twisted.ensureDeferred
async def test_refused_duplicate_has_a_record(tmp_path: Path, logs: LogCapture) -> None:
    """A connection refused as a duplicate named a live call: its row says so; the live leg's row is untouched."""
    async with opened(tmp_path / "records.db") as store:
        line = Line(store)
        call = uuid.uuid4()
        live = line.live(call_id=call)
        line.clock.advance(1)
        intruder = line.connect()
        intruder.dataReceived(encode_uuid(call))
        assert not intruder.live
        intruder.connectionLost(Failure(ConnectionLost()))
        live.connectionLost(Failure(ConnectionDone()))
        records = (await store.query(call_id=str(call)))["records"]
        assert [(r["peer"], r["reason"], r["cause"]) for r in records] == [  # newest first
            (intruder.peer, "duplicate", "duplicate"), (live.peer, "peer_closed", None),
        ]


@pytest_twisted.ensureDeferred
async def test_replaced_leg_keeps_its_own_record(tmp_path: Path, logs: LogCapture) -> None:
    """A second connection for a call id and role gets its own row; the first ends with cause replaced."""
    async with opened(tmp_path / "records.db") as store:
        line = Line(store)
        line.registry.on_duplicate = "replace"
        call = uuid.uuid4()
        old = line.live(call_id=call)
        line.clock.advance(1)
        new = line.live(call_id=call)
        old.connectionLost(Failure(ConnectionLost()))
        line.clock.advance(1)
        new.connectionLost(Failure(ConnectionDone()))
        records = (await store.query(call_id=str(call)))["records"]
        assert records == [expected(new), expected(old)]
        assert (records[1]["reason"], records[1]["cause"]) == ("hangup_reset", "replaced")
        assert (records[0]["reason"], records[0]["cause"]) == ("peer_closed", None)


@pytest_twisted.ensureDeferred
async def test_rows_left_open_are_closed_as_server_lost(tmp_path: Path, logs: LogCapture) -> None:
    """
    Rows of legs that never ended (the server went away) are closed by the
    next open, at the time of that recovery, with reason server_lost; the
    cause already sent is kept, the counters stay unknown.
    """
    path = tmp_path / "records.db"
    clock = ThreadedClock(time.time())
    async with opened(path, clock) as store:
        line = Line(store, now=clock.seconds() - 60)
        lost = [line.live(), line.live(Role.RESIDENT), line.live()]
        lost[2].hangup(HangupCause.SHUTDOWN)
        done = line.ended()
        await store.query()  # every write is in
    clock.advance(30)
    recovery = clock.seconds()
    store = CallRecords(str(path), clock)
    try:
        assert await store.open() == 3
        records = await everything(store)
    finally:
        await store.close()
    by_call = {record["call_id"]: record for record in records}
    assert by_call.pop(done.call_id) == expected(done)
    assert len(by_call) == 3
    for leg in lost:
        assert by_call[leg.call_id] == {
            "call_id": leg.call_id,
            "role": leg.role.value,
            "peer": leg.peer,
            "started_at": iso_time(leg.connected_at),
            "ended_at": iso_time(recovery),
            "reason": SERVER_LOST,
            "cause": "shutdown" if leg is lost[2] else None,
            "frames_in": None,
            "frames_out": None,
            "bytes_in": None,
            "bytes_out": None,
            "dtmf": None,
            "hangup_to_close_ms": None,
            "streams": [],
            "recording": None,
        }
    assert "3 call records left open by an earlier run closed as server_lost" in logs.texts()
    store = CallRecords(str(path), clock)
    try:
        assert await store.open() == 0  # nothing more to recover
        assert len(await everything(store, reason=SERVER_LOST)) == 3
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_version_1_database_is_upgraded(tmp_path: Path, logs: LogCapture) -> None:
    """
    A database from version 1 keeps its rows, gains the new columns (NULL in
    old rows: not recorded then), and ends at the current version, with the
    same table as a database created fresh.
    """
    path = tmp_path / "old.db"
    started = time.time() - 600
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V1)
    conn.execute(
        "INSERT INTO call_records (call_id, role, peer, started_at, ended_at, reason, cause, "
        "frames_in, frames_out, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("6f5c1279-b34f-4bdf-ba44-24b178d09a80", "visitor", "127.0.0.1:51850", started, started + 12.5,
         "hangup_reset", "api", 625, 626, 201894, 201920),
    )
    conn.execute(
        "INSERT INTO call_records (call_id, role, peer, started_at) VALUES (?, ?, ?, ?)",
        ("0b7c7d0e-6b0e-4e44-a3c4-0c6f1b0d2a11", "resident", "127.0.0.1:51851", started + 1),
    )
    conn.commit()
    conn.close()

    store = CallRecords(str(path), reactor)
    try:
        assert await store.open() == 1  # the v1 row left open
        line = Line(store, now=started + 60)
        leg = line.live()
        leg.dataReceived(DTMF_42)
        leg.connectionLost(Failure(ConnectionDone()))
        new, lost, old = await everything(store)
    finally:
        await store.close()
    assert new == expected(leg)
    assert old == {
        "call_id": "6f5c1279-b34f-4bdf-ba44-24b178d09a80",
        "role": "visitor",
        "peer": "127.0.0.1:51850",
        "started_at": iso_time(started),
        "ended_at": iso_time(started + 12.5),
        "reason": "hangup_reset",
        "cause": "api",
        "frames_in": 625,
        "frames_out": 626,
        "bytes_in": 201894,
        "bytes_out": 201920,
        "dtmf": None,
        "hangup_to_close_ms": None,
        "streams": [],
        "recording": None,
    }
    assert (lost["call_id"], lost["reason"]) == ("0b7c7d0e-6b0e-4e44-a3c4-0c6f1b0d2a11", SERVER_LOST)
    assert any("upgraded from version 1" in text for text in logs.texts())

    fresh = tmp_path / "fresh.db"
    async with opened(fresh):
        pass
    schemas = []
    for db in (path, fresh):
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            columns = [row[1:] for row in conn.execute("PRAGMA table_info(call_records)")]
            indexes = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'"))
            schemas.append((columns, indexes))
        finally:
            conn.close()
    assert schemas[0] == schemas[1]
    names = [column[0] for column in schemas[0][0]]
    assert names[-4:] == ["dtmf", "hangup_to_close_ms", "streams", "recording"]


@pytest_twisted.ensureDeferred
async def test_records_are_private_whatever_the_umask(tmp_path: Path, logs: LogCapture) -> None:
    """Under umask 022 the store, its -wal and its -shm are 0600: the rows hold live call ids."""
    previous = os.umask(0o022)
    try:
        async with opened(tmp_path / "records.db") as store:
            Line(store).ended()
            await store.query()
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    finally:
        os.umask(previous)
    assert modes == {"records.db": 0o600, "records.db-wal": 0o600, "records.db-shm": 0o600}
    assert not [event for event in logs.events if event.get("log_level") is LogLevel.warn]


@pytest_twisted.ensureDeferred
async def test_a_store_others_can_read_is_warned_of(tmp_path: Path, logs: LogCapture) -> None:
    """One an earlier version left 0644 keeps its mode (the operator's to change) and is named at open."""
    path = tmp_path / "records.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    async with opened(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    [warned] = [event for event in logs.events if event.get("log_level") is LogLevel.warn]
    assert "chmod 600" in warned["log_format"] and warned["mode"] == 0o644


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database from a newer audiohangup is not touched, and the store is left closed."""
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V1 + "PRAGMA user_version = 5;")
    conn.close()
    store = CallRecords(str(path), reactor)
    with pytest.raises(SchemaTooNew):
        await store.open()
    assert not store._pool.started
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    conn.close()


@pytest_twisted.ensureDeferred
async def test_pages_newest_first(tmp_path: Path, logs: LogCapture) -> None:
    """
    25 records in pages of 10: 10, 10, 5, newest first by (start, id), ties
    included, no duplicate and no gap, and the last page says so; a leg
    started meanwhile does not shift the pages.
    """
    async with opened(tmp_path / "records.db") as store:
        line = Line(store)
        legs = []
        for i in range(25):
            line.clock.advance(0 if i % 4 == 1 else 1.5)  # a few start at the same time as the one before
            legs.append(line.ended(Role.RESIDENT if i % 3 else Role.VISITOR, hangup=i % 2 == 0))
        newest_first = [leg.call_id for leg in reversed(legs)]
        pages = []
        cursor = None
        for _ in range(3):
            page = await store.query(limit=10, cursor=cursor)
            pages.append([record["call_id"] for record in page["records"]])
            cursor = page["next_cursor"]
            if len(pages) == 1:
                line.clock.advance(10)
                line.ended()  # newer than every page: must not appear in pages 2 and 3
        assert [len(page) for page in pages] == [10, 10, 5]
        assert cursor is None
        assert pages[0] + pages[1] + pages[2] == newest_first
        assert isinstance(page["records"][0]["started_at"], str)

        # A last page exactly full still ends the walk.
        page = await store.query(limit=13)
        page = await store.query(limit=13, cursor=page["next_cursor"])
        assert len(page["records"]) == 13 and page["next_cursor"] is None
        assert [r["call_id"] for r in page["records"]] == newest_first[12:]


@pytest_twisted.ensureDeferred
async def test_filters(tmp_path: Path, logs: LogCapture) -> None:
    """call_id, role, reason, since (inclusive) and until (exclusive), alone, together, and paged."""
    async with opened(tmp_path / "records.db") as store:
        line = Line(store)
        call = uuid.uuid4()
        legs = []
        for i in range(12):
            line.clock.advance(2)
            legs.append(line.ended(Role.RESIDENT if i % 3 == 0 else Role.VISITOR, hangup=i % 2 == 1))
        pair = [line.ended(Role.VISITOR, call_id=call), line.ended(Role.RESIDENT, call_id=call)]
        legs += pair

        def ids(records: list[dict[str, Any]]) -> list[str]:
            return [(record["call_id"], record["role"]) for record in records]

        def newest_first(selected: list[AudioSocketProtocol]) -> list[tuple[str, str]]:
            return [(leg.call_id, leg.role.value) for leg in reversed(selected)]

        assert ids(await everything(store, call_id=str(call))) == newest_first(pair)
        assert ids(await everything(store, call_id=str(uuid.uuid4()))) == []
        assert ids(await everything(store, role="resident")) == newest_first([leg for leg in legs if leg.role is Role.RESIDENT])
        assert ids(await everything(store, role=Role.VISITOR)) == newest_first([leg for leg in legs if leg.role is Role.VISITOR])
        assert ids(await everything(store, reason="hangup_clean")) == newest_first(
            [leg for leg in legs if leg.close_reason is CloseReason.HANGUP_CLEAN]
        )
        assert ids(await everything(store, reason=CloseReason.PEER_CLOSED)) == newest_first(
            [leg for leg in legs if leg.close_reason is CloseReason.PEER_CLOSED]
        )
        assert ids(await everything(store, reason="server_lost")) == []
        since, until_ = legs[3].connected_at, legs[9].connected_at
        assert ids(await everything(store, since=since, until=until_)) == newest_first(legs[3:9])
        assert ids(await everything(store, since=since)) == newest_first(legs[3:])
        assert ids(await everything(store, until=until_)) == newest_first(legs[:9])
        assert ids(await everything(store, since=since, until=until_, role="resident", reason="peer_closed")) == (
            newest_first([leg for leg in legs[3:9] if leg.role is Role.RESIDENT and leg.close_reason is CloseReason.PEER_CLOSED])
        )
        # Paged through a filter: pages of 2 over the visitors.
        walked, cursor = [], None
        while True:
            page = await store.query(role="visitor", limit=2, cursor=cursor)
            assert len(page["records"]) <= 2
            walked += page["records"]
            if (cursor := page["next_cursor"]) is None:
                break
        assert ids(walked) == newest_first([leg for leg in legs if leg.role is Role.VISITOR])


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "not a cursor!"},
        {"cursor": base64.urlsafe_b64encode(b"not a cursor").decode()},
        {"cursor": base64.urlsafe_b64encode(b"nan:3").decode()},
        {"cursor": base64.urlsafe_b64encode(b"1700000000.5:-3").decode()},
        {"cursor": base64.urlsafe_b64encode(b"1700000000.5").decode()},
        {"cursor": base64.urlsafe_b64encode("1700000000.5:\u0663".encode()).decode()},
        {"cursor": "////"},
        {"cursor": base64.urlsafe_b64encode(b"1700000000.5:9999999999999999999").decode()},
        {"cursor": 12},
        {"limit": 0},
        {"limit": 501},
        {"limit": True},
        {"limit": "10"},
        {"role": "caller"},
        {"reason": "hung_up"},
        {"since": "yesterday"},
        {"until": float("nan")},
        {"call_id": 42},
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_query(tmp_path: Path, params: dict[str, Any]) -> None:
    """A malformed parameter raises BadQuery (a ValueError) at once, before any I/O."""
    async with opened(tmp_path / "records.db") as store:
        with pytest.raises(BadQuery):
            store.query(**params)
        assert issubclass(BadQuery, ValueError)


@pytest_twisted.ensureDeferred
async def test_good_cursor_edge_cases(tmp_path: Path) -> None:
    """An empty cursor is the first page; a well-formed cursor past everything is an empty last page."""
    async with opened(tmp_path / "records.db") as store:
        line = Line(store)
        legs = [line.ended() for _ in range(3)]
        assert (await store.query(cursor="")) == (await store.query())
        oldest = base64.urlsafe_b64encode(f"{legs[0].connected_at!r}:1".encode()).decode().rstrip("=")
        assert (await store.query(cursor=oldest)) == {"records": [], "next_cursor": None}
        assert len((await store.query(limit=500))["records"]) == 3
        assert len((await store.query(limit=1))["records"]) == 1


@pytest_twisted.ensureDeferred
async def test_prune(tmp_path: Path, logs: LogCapture) -> None:
    """
    Rows that started longer ago than keep_days go, at open and then daily;
    newer rows stay; the daily timer is gone once the store is closed.
    """
    path = tmp_path / "records.db"
    clock = ThreadedClock(time.time())
    now = clock.seconds()
    async with opened(path, clock, keep_days=0) as keep_all:  # 0 keeps everything
        assert clock.getDelayedCalls() == []
        legs = {}
        for age in (40, 31, 29.5, 1):
            legs[age] = Line(keep_all, now=now - age * DAY).ended()
        assert await keep_all.prune() == 0
        assert len(await everything(keep_all)) == 4

    store = CallRecords(str(path), clock, keep_days=30)
    try:
        assert await store.open() == 0
        assert "2 call records older than 30 days pruned" in logs.texts()
        assert {r["call_id"] for r in await everything(store)} == {legs[29.5].call_id, legs[1].call_id}
        [daily] = clock.getDelayedCalls()
        assert daily.getTime() == now + DAY

        Line(store, now=now - 45 * DAY).ended()  # a late write of an old leg
        assert await store.prune() == 1

        clock.advance(DAY)  # the daily prune: 29.5 days old is now 30.5
        await until(lambda: len(clock.getDelayedCalls()) == 1 and clock.getDelayedCalls()[0].getTime() == now + 2 * DAY)
        remaining = await everything(store)
        assert [r["call_id"] for r in remaining] == [legs[1].call_id]
    finally:
        await store.close()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_failing_disk_never_breaks_a_call(tmp_path: Path, logs: LogCapture) -> None:
    """
    Every write failing (disk I/O error): the legs run and end as usual,
    each failure is one error line with the call id, counted, and nothing
    else: no traceback, no failure event, no unhandled error.
    """
    metrics = CollectorRegistry()
    async with opened(tmp_path / "records.db", metrics=metrics) as store:

        def disk_error(*args: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        for name in ("start", "hangup", "end"):
            setattr(store._db, name, disk_error)
        line = Line(store)
        leg = line.live()
        assert leg.hangup(HangupCause.API) is not None
        leg.connectionLost(Failure(ConnectionLost()))
        assert leg.close_reason is CloseReason.HANGUP_RESET
        assert (await store.query())["records"] == []  # queued after the writes: they are done
    failed = errors(logs)
    assert len(failed) == 3
    for event, what in zip(failed, ("start", "hangup", "end")):
        assert event["call_id"] == leg.call_id
        assert event["what"] == what
        assert "disk I/O error" in event["error"]
        assert "log_failure" not in event
    assert metrics.get_sample_value("audiohangup_call_records_failed_total") == 3
    assert metrics.get_sample_value("audiohangup_call_records_written_total") == 0
    assert logs.ended(leg.call_id)[0]["reason"] is CloseReason.HANGUP_RESET


@pytest_twisted.ensureDeferred
async def test_read_only_database(tmp_path: Path, logs: LogCapture) -> None:
    """
    A real SQLite write failure (the connection made read-only, which works
    as root too): logged and counted; once writable again, records resume.
    """
    counts = Counts()
    async with opened(tmp_path / "records.db", metrics=counts.metrics) as store:
        await store._run(lambda: store._db.conn.execute("PRAGMA query_only = 1"))
        line = Line(store)
        lost = line.ended()
        await store.query()
        failed = errors(logs)
        assert [e["call_id"] for e in failed] == [lost.call_id, lost.call_id]
        assert all("readonly" in e["error"] for e in failed)
        assert (counts.written, counts.failed) == (0, 2)

        await store._run(lambda: store._db.conn.execute("PRAGMA query_only = 0"))
        kept = line.ended()
        assert (await store.query())["records"] == [expected(kept)]
        assert (counts.written, counts.failed) == (2, 2)


@pytest_twisted.ensureDeferred
async def test_failed_start_is_healed_by_the_end(tmp_path: Path, logs: LogCapture) -> None:
    """If the row's insert fails, the end writes the whole row: one failure, no record lost."""
    counts = Counts()
    async with opened(tmp_path / "records.db", metrics=counts.metrics) as store:
        start = store._db.start

        def fail_once(*args: Any) -> None:
            store._db.start = start
            raise sqlite3.OperationalError("database is locked")

        store._db.start = fail_once
        line = Line(store)
        leg = line.live()
        leg.hangup(HangupCause.API)  # nothing to update yet: skipped, not failed
        line.clock.advance(0.002)
        leg.connectionLost(Failure(ConnectionDone()))
        assert (await store.query())["records"] == [expected(leg)]
    assert (counts.written, counts.failed) == (2, 1)
    [event] = errors(logs)
    assert event["call_id"] == leg.call_id and "database is locked" in event["error"]


@pytest_twisted.ensureDeferred
async def test_writes_outside_open_are_logged(tmp_path: Path, logs: LogCapture) -> None:
    """Legs told to a store not yet open, or already closed, raise nothing: logged and counted."""
    counts = Counts()
    store = CallRecords(str(tmp_path / "records.db"), reactor, metrics=counts.metrics)
    line = Line(store)
    early = line.ended()
    await store.open()
    await store.close()
    await store.close()  # twice is fine
    late = line.ended()
    assert (counts.written, counts.failed) == (0, 4)
    assert [e["call_id"] for e in errors(logs)] == [early.call_id] * 2 + [late.call_id] * 2
    with pytest.raises(RuntimeError):
        store.query()
    with pytest.raises(RuntimeError):
        store.prune()
    with pytest.raises(RuntimeError):
        await store.open()


@pytest_twisted.ensureDeferred
async def test_close_before_open(tmp_path: Path) -> None:
    """close() before open() is fine, twice too, and creates nothing; keep_days is checked."""
    never = CallRecords(str(tmp_path / "never.db"), reactor)
    await never.close()
    await never.close()
    assert not (tmp_path / "never.db").exists()
    with pytest.raises(ValueError):
        CallRecords(str(tmp_path / "x.db"), reactor, keep_days=-1)


@pytest_twisted.ensureDeferred
async def test_reactor_shutdown_writes_what_is_queued(tmp_path: Path, logs: LogCapture) -> None:
    """
    A store nobody closed closes itself in the reactor's C{during shutdown}
    phase (after the service's drain, in C{before}): synchronously, with
    every queued write in, even behind a slow disk.
    """
    path = tmp_path / "records.db"
    store = CallRecords(str(path), reactor)
    await store.open()
    try:
        trigger = store._trigger
        assert trigger[1][0] == "during"  # Twisted's handle: (event, (phase, callable, args, kwargs))
        reactor.removeSystemEventTrigger(trigger)  # we fire it ourselves, below
        slow = threading.Event()
        start = store._db.start

        def slow_start(*args: Any) -> None:
            assert slow.wait(30)
            start(*args)

        store._db.start = slow_start
        line = Line(store)
        ended = [line.ended() for _ in range(5)]
        live = line.live()
        threading.Timer(0.2, slow.set).start()
        store._reactorShutdown()  # what the reactor calls; blocks until the writes are in
        assert not store._pool.started
        conn = sqlite3.connect(path)
        try:
            rows = conn.execute("SELECT call_id, reason FROM call_records ORDER BY id").fetchall()
        finally:
            conn.close()
        assert rows == [(leg.call_id, "peer_closed") for leg in ended] + [(live.call_id, None)]
        late = line.ended()  # after the store closed: logged, never raised
        assert [e["what"] for e in errors(logs) if e["call_id"] == late.call_id] == ["start", "end"]
    finally:
        slow.set()
        await store.close()
    async with opened(path) as store:
        assert store._trigger is not None
    assert store._trigger is None  # close() removed it


@pytest_twisted.ensureDeferred
async def test_writes_never_block_the_reactor(tmp_path: Path, logs: LogCapture) -> None:
    """
    With the writer thread stuck (a disk that hangs), legs start and end at
    once and the reactor runs on; when the disk comes back every write lands,
    in order, before a query made meanwhile answers.
    """
    stuck = threading.Event()
    counts = Counts()
    async with opened(tmp_path / "records.db", metrics=counts.metrics) as store:
        start = store._db.start

        def slow_start(*args: Any) -> None:
            assert stuck.wait(30), "never released"
            start(*args)

        store._db.start = slow_start
        try:
            line = Line(store)
            began = time.monotonic()
            legs = [line.ended(hangup=i % 2 == 0) for i in range(50)]
            elapsed = time.monotonic() - began
            assert elapsed < 0.5, f"50 legs took {elapsed:.3f} s with the writer stuck"
            answer = store.query(limit=100)
            await deferLater(reactor, 0.1)  # the reactor turns while the writer waits
            assert not answer.called
            assert counts.written == 0
        finally:
            stuck.set()
        records = (await answer)["records"]
        assert records == [expected(leg) for leg in reversed(legs)]
    assert (counts.written, counts.failed) == (125, 0)
