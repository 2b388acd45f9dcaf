"""
Fault injection over real loopback TCP.

For each point of a leg's life the fake Asterisk resets (SO_LINGER 0, a RST),
closes cleanly (a FIN) or goes silent (sends nothing more and never closes).
After each scenario: exactly one "leg ended" event with the reason derived
below, an empty registry, the process's open file descriptors back to their
count before the scenario, and (the C{logs} fixture) no traceback, failure or
"Unhandled" in the log.

The server runs in this process (C{make_server}), so C{/proc/self/fd} counts
its sockets, its SQLite files and the fake client's sockets together: every
scenario waits for the client's own C{connectionLost} before counting.

Every wait is bounded and driven by an event (a Deferred, or L{until} polling
a condition); the silent scenarios end by the server's own timers, kept short.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.wire import encode_uuid
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import SILENCE_20MS, FakeAsterisk

T = TypeVar("T")

#: Short server timers for the scenarios that end by one of them.
SHORT = {"uuid_timeout": 0.3, "close_timeout": 0.3}
#: Scenarios that end by the client's own act keep generous timers, so a
#: stall of this loaded machine cannot turn a reset into a timeout.
LONG = {"uuid_timeout": 5.0, "close_timeout": 2.0}
#: A silent peer with no hangup coming would hold the leg for ever (Asterisk's
#: inactivity timer is on Asterisk's side): the idle timeout hangs it up.
IDLE = 0.5


class FaultyAsterisk(FakeAsterisk):
    """A fake Asterisk that can also close for sure with a FIN."""

    def close_clean(self) -> None:
        """
        Send a FIN and keep reading until the server closes.

        C{close()} stops reading at once and closes the socket one reactor
        turn later; a silence frame from the server's pacer landing in that
        turn stays unread, and Linux answers the close of a socket with
        unread data with a RST, not a FIN: a "close" scenario would then be
        a reset one now and then. Shutting down only the sending side keeps
        reading, so the peer sees a clean end of stream every time.
        """
        self.transport.loseWriteConnection()


async def connect(port: int, **options: Any) -> FaultyAsterisk:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await connectProtocol(endpoint, FaultyAsterisk(**options))  # type: ignore[arg-type]


async def within(waiting: Deferred[T] | Awaitable[T], what: str, timeout: float = 5.0) -> T:
    """Await, bounded: a missing event fails the test instead of hanging it."""
    deferred = waiting if isinstance(waiting, Deferred) else Deferred.fromCoroutine(waiting)  # type: ignore[arg-type]
    try:
        return await deferred.addTimeout(timeout, reactor)
    except DeferredTimeout:
        raise AssertionError(f"timed out waiting for {what}") from None


# Open file descriptors of this process (the server and the client alike).


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_fds() -> dict[int, str]:
    """
    Each open descriptor and what it is, to name a leak in a failure. The
    listing's own descriptor, closed by the time it is read, is left out:
    compare counts with L{fd_count}, not with the length of this.
    """
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


@dataclass(frozen=True)
class FdSnapshot:
    count: int
    fds: dict[int, str]


def fd_snapshot() -> FdSnapshot:
    # From its first listening port on, Twisted keeps one descriptor open on
    # /dev/null for the life of the process (to get out of EMFILE); reserve
    # it now, or a test run alone counts it as leaked by the server.
    from twisted.internet import tcp

    tcp._reservedFD.reserve()
    return FdSnapshot(fd_count(), open_fds())


async def assert_fds_back_to(before: FdSnapshot, timeout: float = 5.0) -> None:
    """Wait, bounded, for the count of open fds to settle back to C{before}'s."""
    try:
        await until(lambda: fd_count() == before.count, timeout=timeout, what="the open fds to settle")
    except AssertionError:
        pass  # the assertion below names the difference
    after = fd_snapshot()
    gained = {fd: what for fd, what in after.fds.items() if before.fds.get(fd) != what}
    lost = {fd: what for fd, what in before.fds.items() if after.fds.get(fd) != what}
    assert after.count == before.count, (
        f"open fds: {before.count} before, {after.count} after; new {gained}, gone {lost}"
    )


# The server


async def start(make_server: Callable[..., Awaitable[Server]], logs: LogCapture, records: Path, **options: Any) -> Server:
    """A server whose call records store is open (its SQLite fds are part of the baseline)."""
    server = await make_server(records=str(records), **options)
    await until(
        lambda: any(str(records) in event.get("path", "") and "schema version" in event.get("log_format", "")
                    for event in logs.events),
        what="the call records to open",
    )
    return server


def recent_legs(server: Server) -> list[dict[str, Any]]:
    """The live page's history of ended legs (only legs that had a UUID)."""
    return server.api.recent.latest(100)


def rows_in(records: Path) -> list[tuple[Any, ...]]:
    """The call records, read from the file itself (for a store the shutdown closed)."""
    with sqlite3.connect(f"file:{records}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT call_id, role, reason, cause FROM call_records").fetchall()
    conn.close()
    return rows


# The scenarios


POINTS = (
    "before_any_byte",
    "inside_uuid_header",
    "inside_uuid_payload",
    "between_frames",
    "inside_audio_payload",
    "right_after_our_hangup",
    "while_api_writes_hangup",
    "during_shutdown",
)
ACTIONS = ("reset", "close", "silent")


@dataclass(frozen=True)
class Outcome:
    """How a scenario may end: the leg's reason and cause, and the API's status if it was asked."""

    reason: CloseReason
    cause: HangupCause | None = None
    status: int | None = None


R, C = CloseReason, HangupCause
API = HangupCause.API

#: (point, action) -> the outcomes that are correct. One outcome, except for
#: the race between the API's hangup and the peer's own close: the request
#: finds the leg gone (404; the peer's reason) or hangs it up (200; ours).
EXPECTED: dict[tuple[str, str], frozenset[Outcome]] = {
    # Before the UUID is complete there is no leg: call id "-", nothing recorded.
    ("before_any_byte", "reset"): frozenset({Outcome(R.PEER_RESET)}),
    ("before_any_byte", "close"): frozenset({Outcome(R.PEER_CLOSED)}),
    ("before_any_byte", "silent"): frozenset({Outcome(R.UUID_TIMEOUT)}),
    ("inside_uuid_header", "reset"): frozenset({Outcome(R.PEER_RESET)}),
    ("inside_uuid_header", "close"): frozenset({Outcome(R.PEER_CLOSED)}),
    ("inside_uuid_header", "silent"): frozenset({Outcome(R.UUID_TIMEOUT)}),
    ("inside_uuid_payload", "reset"): frozenset({Outcome(R.PEER_RESET)}),
    ("inside_uuid_payload", "close"): frozenset({Outcome(R.PEER_CLOSED)}),
    ("inside_uuid_payload", "silent"): frozenset({Outcome(R.UUID_TIMEOUT)}),
    # A live leg, no hangup of ours: the peer's own end; silence meets the
    # idle timeout, whose hangup the silent peer never answers.
    ("between_frames", "reset"): frozenset({Outcome(R.PEER_RESET)}),
    ("between_frames", "close"): frozenset({Outcome(R.PEER_CLOSED)}),
    ("between_frames", "silent"): frozenset({Outcome(R.HANGUP_TIMEOUT, C.IDLE_TIMEOUT)}),
    ("inside_audio_payload", "reset"): frozenset({Outcome(R.PEER_RESET)}),
    ("inside_audio_payload", "close"): frozenset({Outcome(R.PEER_CLOSED)}),
    ("inside_audio_payload", "silent"): frozenset({Outcome(R.HANGUP_TIMEOUT, C.IDLE_TIMEOUT)}),
    # The peer acts on reading our 00 00 00.
    ("right_after_our_hangup", "reset"): frozenset({Outcome(R.HANGUP_RESET, API)}),
    ("right_after_our_hangup", "close"): frozenset({Outcome(R.HANGUP_CLEAN, API)}),
    ("right_after_our_hangup", "silent"): frozenset({Outcome(R.HANGUP_TIMEOUT, API)}),
    # The peer acts in the reactor turn the POST .../hangup?wait=true is sent.
    ("while_api_writes_hangup", "reset"): frozenset(
        {Outcome(R.PEER_RESET, None, 404), Outcome(R.HANGUP_RESET, API, 200)}
    ),
    ("while_api_writes_hangup", "close"): frozenset(
        {Outcome(R.PEER_CLOSED, None, 404), Outcome(R.HANGUP_CLEAN, API, 200)}
    ),
    ("while_api_writes_hangup", "silent"): frozenset({Outcome(R.HANGUP_TIMEOUT, API, 200)}),
    # The peer is inside an audio frame when the server stops; it acts on
    # reading the shutdown's 00 00 00.
    ("during_shutdown", "reset"): frozenset({Outcome(R.HANGUP_RESET, C.SHUTDOWN)}),
    ("during_shutdown", "close"): frozenset({Outcome(R.HANGUP_CLEAN, C.SHUTDOWN)}),
    ("during_shutdown", "silent"): frozenset({Outcome(R.HANGUP_TIMEOUT, C.SHUTDOWN)}),
}
SCENARIOS = [(point, action) for point in POINTS for action in ACTIONS]
assert set(SCENARIOS) == set(EXPECTED)

#: Points at which no UUID has arrived: the connection never becomes a leg.
BEFORE_UUID = {"before_any_byte", "inside_uuid_header", "inside_uuid_payload"}
#: Points at which the client acts on its own (not in answer to our hangup).
OWN_ACT = BEFORE_UUID | {"between_frames", "inside_audio_payload"}
#: What the client does on reading 00 00 00, by action.
ON_HANGUP = {"reset": "reset", "close": "close", "silent": "ignore"}


def server_options(point: str, action: str) -> dict[str, float]:
    if action != "silent":
        return dict(LONG)
    if point in ("between_frames", "inside_audio_payload"):
        return dict(SHORT, idle_timeout=IDLE)
    return dict(SHORT)


def act(client: FaultyAsterisk, action: str) -> None:
    if action == "reset":
        client.reset()
    elif action == "close":
        client.close_clean()
    # "silent": send nothing more, never close


async def reach(point: str, server: Server, client: FaultyAsterisk, call_id: uuid.UUID) -> Any:
    """Drive the connection to C{point}; return the server's side of it once it is there."""
    await until(lambda: len(server.registry.connections()) == 1, what="the server to accept")
    [connection] = server.registry.connections()
    if point == "before_any_byte":
        sent = b""
    elif point == "inside_uuid_header":
        sent = encode_uuid(call_id)[:2]  # kind and the length's first byte
    elif point == "inside_uuid_payload":
        sent = encode_uuid(call_id)[:11]  # the header and 8 of 16 bytes
    elif point == "during_shutdown":
        sent = encode_uuid(call_id) + SILENCE_20MS + SILENCE_20MS[:103]  # inside a frame
    elif point == "inside_audio_payload":
        sent = encode_uuid(call_id) + 2 * SILENCE_20MS + SILENCE_20MS[:103]
    else:
        sent = encode_uuid(call_id) + 2 * SILENCE_20MS
    if sent:
        client.send(sent)
    await until(lambda: connection.bytes_in == len(sent), what=f"the server to read {len(sent)} bytes")
    if point in BEFORE_UUID:
        assert connection.call_id is None and len(server.registry) == 0
    else:
        assert server.registry.get(str(call_id), Role.VISITOR) is connection
    return connection


def check_ended(logs: LogCapture, outcome: Outcome, call_id: str) -> dict[str, Any]:
    """Exactly one 'leg ended' event, with the outcome's reason and cause, at the reason's level."""
    ended = logs.ended()
    assert len(ended) == 1, [(e.get("call_id"), e.get("reason")) for e in ended]
    [event] = ended
    assert event["reason"] is outcome.reason
    assert event["cause"] is outcome.cause
    assert event["call_id"] == call_id
    assert event["role"] is Role.VISITOR
    assert event["log_level"] is outcome.reason.level
    return event


@pytest.mark.parametrize(("point", "action"), SCENARIOS, ids=[f"{p}-{a}" for p, a in SCENARIOS])
@pytest_twisted.ensureDeferred
async def test_fault(make_server: Any, logs: LogCapture, tmp_path: Path, point: str, action: str) -> None:
    records = tmp_path / "records.sqlite3"
    shutdown = point == "during_shutdown"
    before_server = fd_snapshot()
    server = await start(make_server, logs, records, **server_options(point, action))
    before = before_server if shutdown else fd_snapshot()
    call_id = uuid.uuid4()
    on_hangup = "ignore" if point in OWN_ACT or point == "while_api_writes_hangup" else ON_HANGUP[action]
    client = await connect(server.port("visitor"), on_hangup=on_hangup)
    connection = await reach(point, server, client, call_id)

    status: int | None = None
    body: Any = None
    if point in OWN_ACT:
        act(client, action)
    elif point == "right_after_our_hangup":
        connection.hangup(HangupCause.API)
    elif point == "while_api_writes_hangup":
        posting = treq.post(
            f"{server.url}/calls/{call_id}/hangup?role=visitor&wait=true", persistent=False, timeout=10
        )
        act(client, action)  # in the same reactor turn the request is sent
        response = await within(posting, "the hangup request", timeout=10)
        status, body = response.code, json.loads(await within(response.content(), "the answer's body"))
    else:  # during_shutdown: the client is inside an audio frame
        await within(server.service.stopService(), "the shutdown", timeout=10)
        assert server.registry.connections() == []

    reason = await within(connection.whenGone(), "the server's side to end")
    await within(client.closed, "the client's side to end")
    await until(lambda: not server.registry.connections(), what="every connection to go")

    # One 'leg ended' event, of an outcome that is correct here.
    [event] = logs.ended()
    outcome = Outcome(event["reason"], event["cause"], status)
    assert outcome in EXPECTED[point, action], outcome
    assert reason is outcome.reason and connection.close_reason is outcome.reason
    leg_id = "-" if point in BEFORE_UUID else str(call_id)
    check_ended(logs, outcome, leg_id)
    # The timers that ended the silent scenarios ran their full length.
    timer = server.service.settings
    if outcome.reason is R.UUID_TIMEOUT:
        assert event["duration"] >= timer.uuid_timeout - 0.001
    if outcome.reason is R.HANGUP_TIMEOUT:
        assert event["hangup_to_close_ms"] >= timer.close_timeout * 1000 - 1

    # The API's answer agrees with the log.
    if status == 200:
        assert body == {
            "call_id": str(call_id),
            "legs": [{"role": "visitor", "result": "hangup_sent", "reason": outcome.reason.value}],
        }
    elif status == 404:
        assert body["error"]["code"] == "unknown_call"

    # What the client got: 00 00 00 exactly once and nothing after it, when we hung up
    # and the client was still reading; nothing at all before a UUID.
    if point in BEFORE_UUID:
        assert client.frames == []
    if outcome.cause is None:
        assert client.hangup_frames == 0
    elif point != "while_api_writes_hangup" or action == "silent":
        assert client.ended_with_single_hangup()

    # Nothing is left behind.
    assert len(server.registry) == 0
    assert server.registry.connections() == []
    assert list(server.registry) == [] and server.registry.calls() == {}
    started = [e for e in logs.events if "leg started" in e.get("log_format", "")]
    if point in BEFORE_UUID:
        assert started == [] and recent_legs(server) == []
        assert (await within(server.service.records.query(), "the records"))["records"] == []
    else:
        assert [e["call_id"] for e in started] == [str(call_id)]
        [recent] = recent_legs(server)
        assert (recent["call_id"], recent["reason"], recent["cause"]) == (str(call_id), outcome.reason, outcome.cause)
        if not shutdown:
            [row] = (await within(server.service.records.query(), "the records"))["records"]
            assert (row["call_id"], row["reason"], row["cause"]) == (
                str(call_id), outcome.reason.value, outcome.cause and outcome.cause.value
            )

    # Every descriptor is closed again: the server's and the client's.
    await assert_fds_back_to(before)
    if shutdown:
        assert rows_in(records) == [
            (str(call_id), "visitor", outcome.reason.value, outcome.cause and outcome.cause.value)
        ]


# Per-point specifics


@pytest_twisted.ensureDeferred
async def test_reset_before_the_server_accepts(make_server: Any, logs: LogCapture, tmp_path: Path) -> None:
    """
    Before any byte, and before the server has even accepted: a plain socket
    connects (the kernel completes the handshake on its own) and resets at
    once, in one reactor turn, so the connection waits in the listen backlog
    already reset. Linux still hands it to accept(): the server makes it a
    connection, reads the reset and logs peer_reset with call id "-", with
    no error from setting its socket options on a dead socket.
    """
    server = await start(make_server, logs, tmp_path / "records.sqlite3", **LONG)
    before = fd_snapshot()
    raw = socket.create_connection(("127.0.0.1", server.port("visitor")), timeout=5)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    assert server.registry.connections() == []  # not accepted yet
    await until(logs.ended, what="the reset connection to end")
    check_ended(logs, Outcome(R.PEER_RESET), "-")
    await until(lambda: not server.registry.connections(), what="every connection to go")
    assert len(server.registry) == 0 and recent_legs(server) == []
    await assert_fds_back_to(before)


@pytest.mark.parametrize(
    ("action", "reason"), [("reset", R.HANGUP_RESET), ("close", R.HANGUP_CLEAN)], ids=["reset", "close"]
)
@pytest_twisted.ensureDeferred
async def test_peer_acts_right_before_the_api_processes_the_hangup(
    make_server: Any, logs: LogCapture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, reason: CloseReason
) -> None:
    """
    The other end of the race: the request has arrived and the API is
    looking the leg up when the peer resets or closes. The leg is still
    registered (the reactor has not read the peer's end yet), so the API
    writes 00 00 00 and answers 200 with our hangup's reason, never a 500.
    """
    server = await start(make_server, logs, tmp_path / "records.sqlite3", **LONG)
    before = fd_snapshot()
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="ignore")
    leg = await reach("between_frames", server, client, call_id)
    lookup = server.registry.call

    def call(wanted: str) -> Any:
        if wanted == str(call_id):
            act(client, action)
        return lookup(wanted)

    monkeypatch.setattr(server.registry, "call", call)
    response = await within(
        treq.post(f"{server.url}/calls/{call_id}/hangup?wait=true", persistent=False, timeout=10),
        "the hangup request", timeout=10,
    )
    body = json.loads(await within(response.content(), "the answer's body"))
    assert response.code == 200, body
    assert body["legs"] == [{"role": "visitor", "result": "hangup_sent", "reason": reason.value}]
    assert await within(leg.whenGone(), "the leg to end") is reason
    await within(client.closed, "the client's side to end")
    check_ended(logs, Outcome(reason, API), str(call_id))
    await until(lambda: not server.registry.connections(), what="every connection to go")
    assert len(server.registry) == 0
    await assert_fds_back_to(before)


@pytest.mark.parametrize(
    ("action", "ours", "theirs"),
    [
        pytest.param("reset", R.HANGUP_RESET, R.PEER_RESET, id="reset"),
        pytest.param("close", R.HANGUP_CLEAN, R.PEER_CLOSED, id="close"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_peer_acts_as_the_shutdown_starts(
    make_server: Any, logs: LogCapture, tmp_path: Path, action: str, ours: CloseReason, theirs: CloseReason
) -> None:
    """
    The client, inside an audio frame, resets or closes in the same turn the
    server starts stopping. The drain hangs up the leg (cause shutdown, our
    reason) unless the peer's end was read first (the peer's reason, no
    cause). Either way the shutdown completes and leaves nothing open.
    """
    records = tmp_path / "records.sqlite3"
    before = fd_snapshot()
    server = await start(make_server, logs, records, **LONG)
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="ignore")
    leg = await reach("during_shutdown", server, client, call_id)
    act(client, action)
    await within(server.service.stopService(), "the shutdown", timeout=10)
    assert server.registry.connections() == [] and len(server.registry) == 0
    reason = await within(leg.whenGone(), "the leg to end")
    await within(client.closed, "the client's side to end")
    outcome = Outcome(reason, leg.hangup_cause)
    assert outcome in {Outcome(ours, C.SHUTDOWN), Outcome(theirs)}, outcome
    check_ended(logs, outcome, str(call_id))
    await assert_fds_back_to(before)
    assert rows_in(records) == [(str(call_id), "visitor", reason.value, outcome.cause and outcome.cause.value)]


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        pytest.param("hangup", Outcome(R.HANGUP_RESET, API), id="our_hangup"),
        pytest.param("frame", Outcome(R.PEER_RESET), id="a_frame"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_reset_is_not_hidden_by_our_next_write(
    make_server: Any, logs: LogCapture, tmp_path: Path, write: str, expected: Outcome
) -> None:
    """
    The peer's RST has arrived but the reactor has not read it yet when the
    server writes to the leg: our hangup (an API call, the shutdown's drain),
    or a frame (the pacer's tick, a bridged frame). The write fails; the leg
    must still end as a reset, and the reset must not be logged as a clean
    close.

    The client's socket is closed (RST sent, loopback delivers it at once)
    right before its C{connectionLost}; resuming there runs the write in the
    same reactor turn, before the server's next read: deterministic.
    """
    server = await start(make_server, logs, tmp_path / "records.sqlite3", **LONG)
    before = fd_snapshot()
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="ignore")
    leg = await reach("between_frames", server, client, call_id)
    client.reset()
    await within(client.closed, "the client's reset")
    if write == "hangup":
        leg.hangup(HangupCause.API)
    else:
        leg.send(SILENCE_20MS)
    reason = await within(leg.whenGone(), "the leg to end")
    assert Outcome(reason, leg.hangup_cause) == expected
    check_ended(logs, expected, str(call_id))
    await until(lambda: not server.registry.connections(), what="every connection to go")
    await assert_fds_back_to(before)
