"""
Every way a leg ends, over real loopback TCP, with a fake Asterisk on the other
side: the close reason, its level, the bytes on the wire, an empty registry,
and never a traceback in the log (the C{logs} fixture fails the test on one).
"""

from __future__ import annotations

import select
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.wire import HANGUP_FRAME, Kind, encode_frame, encode_uuid
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import SILENCE_20MS, FakeAsterisk, connect


async def start_leg(server: Server, role: Role = Role.VISITOR, **options: object) -> tuple[FakeAsterisk, str]:
    """Connect, send a UUID, and return once the server has registered the leg."""
    call_id = uuid.uuid4()
    client = await connect(server.port(role), **options)
    client.send_uuid(call_id)
    await until(lambda: server.registry.get(str(call_id), role), what="the leg to register")
    return client, str(call_id)


async def hang_up(server: Server, call_id: str, role: Role = Role.VISITOR) -> CloseReason:
    return await server.registry.get(call_id, role).hangup(HangupCause.API)


def assert_only_silence(client: FakeAsterisk) -> None:
    """No 00 00 00 and no audio reached the client: at most the pacer's silence, whatever the timing."""
    assert client.hangup_frames == 0
    assert {frame.encode() for frame in client.frames} <= {SILENCE_20MS}


def assert_ended_once(logs: LogCapture, call_id: str, reason: CloseReason, level: LogLevel) -> dict:
    [event] = logs.ended(call_id)
    assert event["reason"] is reason
    assert event["log_level"] is level
    assert event["call_id"] == call_id
    assert reason.value in logs.texts()[logs.events.index(event)]
    return event


async def wait_gone(server: Server) -> None:
    await until(lambda: not server.registry.connections(), what="every connection to go")


@pytest_twisted.ensureDeferred
async def test_reset_right_after_hangup_is_normal(server: Server, logs: LogCapture) -> None:
    """
    The original bug: Asterisk resets the socket as soon as it reads C{00 00 00}.
    The leg ends as hangup_reset, at info, with no traceback anywhere.
    """
    client, call_id = await start_leg(server, on_hangup="reset")
    assert await hang_up(server, call_id) is CloseReason.HANGUP_RESET
    await client.closed
    assert client.ended_with_single_hangup()
    event = assert_ended_once(logs, call_id, CloseReason.HANGUP_RESET, LogLevel.info)
    assert event["cause"] is HangupCause.API
    assert not any("ConnectionResetError" in text for text in logs.texts())
    assert len(server.registry) == 0


@pytest_twisted.ensureDeferred
async def test_clean_close_after_hangup(server: Server, logs: LogCapture) -> None:
    client, call_id = await start_leg(server, on_hangup="close")
    assert await hang_up(server, call_id) is CloseReason.HANGUP_CLEAN
    assert isinstance(await client.closed, ConnectionDone)
    assert client.ended_with_single_hangup()
    assert_ended_once(logs, call_id, CloseReason.HANGUP_CLEAN, LogLevel.info)


@pytest_twisted.ensureDeferred
async def test_audio_after_hangup_is_read_and_discarded(server: Server, logs: LogCapture) -> None:
    """Asterisk may still be sending when our hangup arrives: we keep reading."""
    client, call_id = await start_leg(server, on_hangup="ignore")
    leg = server.registry.get(call_id, Role.VISITOR)
    gone = leg.hangup(HangupCause.API)
    await client.hangup_received
    for _ in range(5):
        client.send(SILENCE_20MS)
    await until(lambda: leg.bytes_in == 19 + 5 * len(SILENCE_20MS), what="the audio to be read")
    client.close()
    assert await gone is CloseReason.HANGUP_CLEAN
    assert isinstance(await client.closed, ConnectionDone)
    assert client.ended_with_single_hangup()
    assert leg.frames_in == 1  # the UUID; what followed the hangup was discarded


@pytest_twisted.ensureDeferred
async def test_peer_that_never_closes_is_aborted(make_server, logs: LogCapture) -> None:
    server = await make_server(close_timeout=0.2)
    client, call_id = await start_leg(server, on_hangup="ignore")
    assert await hang_up(server, call_id) is CloseReason.HANGUP_TIMEOUT
    await client.closed
    assert client.ended_with_single_hangup()
    event = assert_ended_once(logs, call_id, CloseReason.HANGUP_TIMEOUT, LogLevel.info)
    assert event["hangup_to_close_ms"] >= 200


@pytest_twisted.ensureDeferred
async def test_peer_that_never_reads_is_aborted(make_server, logs: LogCapture) -> None:
    """A peer that stopped reading cannot hold the leg past the close timeout."""
    server = await make_server(close_timeout=0.2)
    client, call_id = await start_leg(server, read=False)
    assert await hang_up(server, call_id) is CloseReason.HANGUP_TIMEOUT
    assert len(server.registry) == 0
    client.transport.resumeProducing()  # only reading tells the client it was cut off
    await client.closed


@pytest_twisted.ensureDeferred
async def test_peer_closes(server: Server, logs: LogCapture) -> None:
    """How Asterisk ends a call: a plain close, no frame. No hangup is sent back, only the pacer's silence before it."""
    client, call_id = await start_leg(server)
    leg = server.registry.get(call_id, Role.VISITOR)
    client.close()
    assert await leg.whenGone() is CloseReason.PEER_CLOSED
    await client.closed
    assert_only_silence(client)
    assert_ended_once(logs, call_id, CloseReason.PEER_CLOSED, LogLevel.info)


@pytest_twisted.ensureDeferred
async def test_peer_resets(server: Server, logs: LogCapture) -> None:
    client, call_id = await start_leg(server)
    leg = server.registry.get(call_id, Role.VISITOR)
    client.reset()
    assert await leg.whenGone() is CloseReason.PEER_RESET
    assert_ended_once(logs, call_id, CloseReason.PEER_RESET, LogLevel.warn)
    assert len(server.registry) == 0


def reset_arrived(leg: object) -> bool:
    """The peer's RST is in the leg's socket (POLLERR), not yet seen by anyone."""
    poller = select.poll()
    poller.register(leg.transport.fileno(), select.POLLERR)
    return bool(poller.poll(0))


@pytest.mark.parametrize(
    ("hang_up_first", "expected"),
    [(False, CloseReason.PEER_RESET), (True, CloseReason.HANGUP_RESET)],
)
@pytest_twisted.ensureDeferred
async def test_reset_reported_as_a_clean_end_is_still_a_reset(
    server: Server, logs: LogCapture, hang_up_first: bool, expected: CloseReason
) -> None:
    """
    Under load, epoll can report a reset as HUP|ERR without IN, and Twisted's
    poll reactors then end the connection as cleanly closed without reading
    (twisted#4604). The leg asks the socket: it is still a reset.
    """
    client, call_id = await start_leg(server, on_hangup="reset")
    leg = server.registry.get(call_id, Role.VISITOR)
    # Nothing else may meet the RST first: not the relay's read nor the reactor's, not the pacer's send.
    assert leg.relay is not None
    leg.relay.release(leg, resume=False)
    leg.transport.stopReading()
    leg.pacer.remove(leg)
    if hang_up_first:
        gone = leg.hangup(HangupCause.API)
        await client.closed  # it read 00 00 00 and reset
    else:
        gone = leg.whenGone()
        client.reset()
    await until(lambda: reset_arrived(leg), what="the RST to arrive")
    # What the reactor does on HUP|ERR without IN for a connection it reads:
    leg.transport.readConnectionLost(Failure(ConnectionDone()))
    assert await gone is expected
    assert_ended_once(logs, call_id, expected, expected.level)
    assert len(server.registry) == 0


@pytest_twisted.ensureDeferred
async def test_peer_sends_hangup(server: Server, logs: LogCapture) -> None:
    """A 0x00 frame from the peer: we send nothing more and close our side."""
    client, call_id = await start_leg(server)
    leg = server.registry.get(call_id, Role.VISITOR)
    client.send(SILENCE_20MS + HANGUP_FRAME)
    assert await leg.whenGone() is CloseReason.PEER_HANGUP
    assert isinstance(await client.closed, ConnectionDone)
    assert_only_silence(client)  # no 00 00 00 back: the peer ended it
    assert_ended_once(logs, call_id, CloseReason.PEER_HANGUP, LogLevel.info)


@pytest_twisted.ensureDeferred
async def test_peer_sends_error(server: Server, logs: LogCapture) -> None:
    client, call_id = await start_leg(server)
    leg = server.registry.get(call_id, Role.VISITOR)
    client.send(encode_frame(Kind.ERROR, b"\x04"))
    assert await leg.whenGone() is CloseReason.PEER_ERROR
    await client.closed
    event = assert_ended_once(logs, call_id, CloseReason.PEER_ERROR, LogLevel.warn)
    assert "memory" in logs.texts()[logs.events.index(event)]


@pytest_twisted.ensureDeferred
async def test_audio_before_uuid(server: Server, logs: LogCapture) -> None:
    client = await connect(server.port("visitor"))
    client.send(SILENCE_20MS)
    assert isinstance(await client.closed, ConnectionDone)
    assert client.frames == []
    [event] = logs.ended()
    assert event["reason"] is CloseReason.PROTOCOL_ERROR
    assert event["log_level"] is LogLevel.warn
    await wait_gone(server)


@pytest_twisted.ensureDeferred
async def test_no_uuid_in_time(make_server, logs: LogCapture) -> None:
    server = await make_server(uuid_timeout=0.2)
    client = await connect(server.port("resident"))
    await client.closed
    assert client.frames == []
    [event] = logs.ended()
    assert event["reason"] is CloseReason.UUID_TIMEOUT
    assert event["role"] is Role.RESIDENT
    await wait_gone(server)


@pytest_twisted.ensureDeferred
async def test_uuid_one_byte_at_a_time(server: Server, logs: LogCapture) -> None:
    call_id = uuid.uuid4()
    client = await connect(server.port("resident"))
    frame = encode_uuid(call_id)
    await client.send_split(frame, range(1, len(frame)))
    leg = await until(lambda: server.registry.get(str(call_id), Role.RESIDENT))
    assert leg.frames_in == 1
    client.close()
    assert await leg.whenGone() is CloseReason.PEER_CLOSED


@pytest_twisted.ensureDeferred
async def test_close_before_or_inside_the_uuid_leaves_nothing(server: Server, logs: LogCapture) -> None:
    """An unanswered channel connects and closes; a truncated UUID likewise."""
    silent = await connect(server.port("visitor"))
    partial = await connect(server.port("visitor"))
    partial.send(encode_uuid(uuid.uuid4())[:11])
    await until(lambda: len(server.registry.connections()) == 2)
    await until(lambda: any(c.bytes_in for c in server.registry.connections()))
    silent.close()
    partial.reset()
    await wait_gone(server)
    assert len(server.registry) == 0
    assert sorted(e["reason"].value for e in logs.ended()) == ["peer_closed", "peer_reset"]


@pytest_twisted.ensureDeferred
async def test_second_connection_replaces_the_first(make_server: Any, logs: LogCapture) -> None:
    """With --on-duplicate replace, the same call id and role again: the old leg is hung up (replaced), the new one lives."""
    server = await make_server(on_duplicate="replace")
    old, call_id = await start_leg(server, on_hangup="reset")
    resident = await connect(server.port("resident"))
    resident.send_uuid(uuid.UUID(call_id))
    await until(lambda: server.registry.get(call_id, Role.RESIDENT))
    first = server.registry.get(call_id, Role.VISITOR)
    new = await connect(server.port("visitor"))
    new.send_uuid(uuid.UUID(call_id))
    await old.closed
    assert await first.whenGone() is CloseReason.HANGUP_RESET
    assert first.hangup_cause is HangupCause.REPLACED
    second = server.registry.get(call_id, Role.VISITOR)
    assert second is not None and second is not first
    assert [leg.role for leg in server.registry.call(call_id)] == [Role.VISITOR, Role.RESIDENT]
    assert_only_silence(new)  # nothing of the old leg's, no 00 00 00: the pacer's silence at most
    assert_only_silence(resident)
    new.close()
    resident.close()
    await wait_gone(server)


@pytest_twisted.ensureDeferred
async def test_shutdown_hangs_up_every_leg(make_server, logs: LogCapture) -> None:
    """Stopping the service hangs up live legs (cause shutdown) and waits for them."""
    server = await make_server(close_timeout=0.3)
    clean, clean_id = await start_leg(server, on_hangup="close")
    stuck, stuck_id = await start_leg(server, Role.RESIDENT, on_hangup="ignore")
    waiting = await connect(server.port("visitor"))
    await until(lambda: len(server.registry.connections()) == 3)
    await server.service.stopService()
    assert server.registry.connections() == []
    assert clean.ended_with_single_hangup() and stuck.ended_with_single_hangup()
    assert waiting.hangup_frames == 1
    reasons = {e["call_id"]: (e["reason"], e["cause"]) for e in logs.ended()}
    assert reasons[clean_id] == (CloseReason.HANGUP_CLEAN, HangupCause.SHUTDOWN)
    assert reasons[stuck_id] == (CloseReason.HANGUP_TIMEOUT, HangupCause.SHUTDOWN)
