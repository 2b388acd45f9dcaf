"""
Flows over real loopback TCP, with fake Asterisk legs: the bridge, echo and
silence flows, a custom flow loaded by dotted path, the pacer's silence, the
end of a session when one leg goes, and prompts played over HTTP (errors,
queue bounds, hangup after playout).

Timing assertions use wide tolerances (a loaded 2-core machine must pass):
first frame within 100 ms, 50 frames/s plus or minus 10 %, a session hangup
within 100 ms.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.defer import TimeoutError as DefTimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater

from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.wire import HANGUP_FRAME, Frame, Kind, encode_frame
from tests import flows_for_tests
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import FakeAsterisk

MakeServer = Callable[..., Awaitable[Server]]
T = TypeVar("T")

#: 20 ms of 8 kHz slin silence, encoded.
SILENCE = encode_frame(Kind.SLIN, bytes(320))
L16_8K = {"Content-Type": "audio/L16;rate=8000"}


class TimedAsterisk(FakeAsterisk):
    """
    A fake Asterisk leg that also records when each frame arrived
    (C{reactor.seconds()}, one entry per frame in C{times}), for the tests of
    the pacer's rate and of how soon a hangup follows a reset.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.times: list[float] = []

    def frameReceived(self, frame: Frame) -> None:
        super().frameReceived(frame)
        self.times.append(reactor.seconds())

    def encoded(self) -> list[bytes]:
        return [frame.encode() for frame in self.frames]

    def heard(self, silence: bytes = SILENCE) -> list[bytes]:
        """Every encoded frame that is neither silence nor the hangup, in order."""
        return [data for data in self.encoded() if data != silence and data != HANGUP_FRAME]


async def connect(port: int, **options: Any) -> TimedAsterisk:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await connectProtocol(endpoint, TimedAsterisk(**options))  # type: ignore[return-value]


async def start_leg(
    server: Server, role: Role, call_id: uuid.UUID | None = None, **options: Any
) -> tuple[TimedAsterisk, Any, str]:
    """Connect a leg, send its UUID, return (client, server-side leg, call id) once registered."""
    call_id = call_id or uuid.uuid4()
    client = await connect(server.port(role), **options)
    client.send_uuid(call_id)
    leg = await until(lambda: server.registry.get(str(call_id), role), what=f"the {role} leg to register")
    return client, leg, str(call_id)


def audio_frame(tag: int, seq: int, size: int = 320) -> bytes:
    """An encoded slin frame that names its sender (tag) and sequence number; never silent."""
    fill = bytes([(seq * 7 + tag * 31) % 254 + 1]) * (size - 3)
    return encode_frame(Kind.SLIN, struct.pack("!BH", tag, seq) + fill)


def slin_frames(audio: bytes) -> list[bytes]:
    """Raw 8 kHz slin cut into encoded 20 ms frames (whole frames only)."""
    return [encode_frame(Kind.SLIN, audio[i : i + 320]) for i in range(0, len(audio), 320)]


async def send_paced(client: FakeAsterisk, frames: Sequence[bytes], interval: float = 0.020) -> None:
    for frame in frames:
        client.send(frame)
        await deferLater(reactor, interval)


async def more_frames(client: TimedAsterisk, count: int, what: str = "") -> None:
    """Wait until C{count} more frames have arrived on C{client}."""
    target = len(client.frames) + count
    await until(lambda: len(client.frames) >= target, what=what or f"{count} more frames")


async def within(waiting: Deferred[T], what: str, timeout: float = 5.0) -> T:
    """Await a Deferred, bounded: a missing event fails the test instead of hanging it."""
    try:
        return await waiting.addTimeout(timeout, reactor)
    except DefTimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def get_json(url: str) -> tuple[int, Any]:
    response = await treq.get(url, persistent=False, timeout=10)
    return response.code, await response.json()


async def post_json(url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    response = await treq.post(url, persistent=False, timeout=10, **kwargs)
    body = await response.content()
    return response.code, json.loads(body), response


def snapshot_of(calls: dict, call_id: str, role: str) -> dict:
    [call] = [call for call in calls["calls"] if call["call_id"] == call_id]
    [leg] = [leg for leg in call["legs"] if leg["role"] == role]
    return leg


def failures(logs: LogCapture, error_type: type) -> list[dict]:
    return [
        event
        for event in logs.events
        if "log_failure" in event and event["log_failure"].check(error_type)
    ]


# 1. The bridge


@pytest_twisted.ensureDeferred
async def test_bridge_forwards_every_frame_both_ways(server: Server, logs: LogCapture) -> None:
    """
    Each leg hears every frame of the other, byte-exact and in order, with only
    the pacer's silence in between; DTMF is kept on its leg, never forwarded.
    """
    visitor, visitor_leg, call_id = await start_leg(server, Role.VISITOR)
    resident, resident_leg, _ = await start_leg(server, Role.RESIDENT, uuid.UUID(call_id))
    from_visitor = [audio_frame(1, seq) for seq in range(50)]
    from_resident = [audio_frame(2, seq) for seq in range(50)]
    await gatherResults(
        [ensureDeferred(send_paced(visitor, from_visitor)), ensureDeferred(send_paced(resident, from_resident))]
    )
    await until(lambda: len(resident.heard()) >= 50, what="the visitor's 50 frames on the resident")
    await until(lambda: len(visitor.heard()) >= 50, what="the resident's 50 frames on the visitor")
    assert resident.heard() == from_visitor
    assert visitor.heard() == from_resident
    for client in (visitor, resident):
        assert all(data == SILENCE for data in client.encoded() if data not in from_visitor + from_resident)

    # DTMF, then a marker frame: once the marker is through, a forwarded DTMF would be too.
    marker = audio_frame(1, 999)
    visitor.send(encode_frame(Kind.DTMF, b"5") + marker)
    await until(lambda: marker in resident.heard(), what="the marker frame")
    assert [frame for frame in resident.frames if frame.kind == Kind.DTMF] == []
    assert {frame.kind for frame in resident.frames} == {Kind.SLIN}
    assert resident.heard() == from_visitor + [marker]
    status, calls = await get_json(f"{server.url}/calls")
    assert status == 200
    assert snapshot_of(calls, call_id, "visitor")["dtmf"] == "5"
    assert snapshot_of(calls, call_id, "resident")["dtmf"] == ""

    visitor.close()
    await within(gatherResults([visitor_leg.whenGone(), resident_leg.whenGone()]), "both legs to go")
    assert resident.ended_with_single_hangup()
    assert len(server.registry) == 0


# 2. A lone leg hears the pacer's silence


@pytest_twisted.ensureDeferred
async def test_lone_leg_hears_paced_silence(server: Server, logs: LogCapture) -> None:
    """
    Silence from the UUID on, with nothing sent by the leg (it never waits
    for Asterisk's audio): one frame on every tick of the pacer, and ticks
    never closer than 20 ms. Counted against the pacer's own ticks, so a
    starved machine, which skips late ticks, changes nothing here.
    """
    call_id = uuid.uuid4()
    client = await connect(server.port(Role.VISITOR))
    client.send_uuid(call_id)
    await until(lambda: client.frames, what="the first frame")
    leg = server.registry.get(str(call_id), Role.VISITOR)
    pacer = server.service.pacer
    ticks, frames, began = pacer.ticks, leg.frames_out, reactor.seconds()
    await until(lambda: pacer.ticks >= ticks + 100, timeout=30, what="100 more ticks")
    assert leg.frames_out - frames == pacer.ticks - ticks  # a frame on every tick
    assert reactor.seconds() - began >= (pacer.ticks - ticks - 1) * 0.020  # never a burst
    await until(lambda: len(client.frames) >= leg.frames_out, what="every frame at the client")
    assert set(client.encoded()) == {SILENCE}
    assert leg.frames_in == 1  # the UUID: the silence owes nothing to inbound audio
    assert leg.bytes_in == 19
    client.close()
    assert await within(leg.whenGone(), "the leg to go") is CloseReason.PEER_CLOSED


@pytest.mark.parametrize(
    ("audio", "silence"),
    [
        ("slin16", encode_frame(Kind.SLIN16, bytes(640))),
        ("ulaw", encode_frame(Kind.SLIN, b"\xff" * 160)),
        ("alaw", encode_frame(Kind.SLIN, b"\xd5" * 160)),
    ],
    ids=["slin16", "ulaw", "alaw"],
)
@pytest_twisted.ensureDeferred
async def test_silence_matches_the_audio_format(
    make_server: MakeServer, logs: LogCapture, audio: str, silence: bytes
) -> None:
    server = await make_server(audio=audio)
    client, leg, _ = await start_leg(server, Role.RESIDENT)
    await until(lambda: len(client.frames) >= 10, what="10 frames")
    assert set(client.encoded()) == {silence}
    client.close()
    assert await within(leg.whenGone(), "the leg to go") is CloseReason.PEER_CLOSED


# 3. One leg ends: the session ends


@pytest_twisted.ensureDeferred
async def test_reset_of_one_leg_hangs_up_the_other(make_server: MakeServer, logs: LogCapture) -> None:
    """
    The other leg gets C{00 00 00} (cause session) within 100 ms and nothing
    after it. It ignores the hangup, so the server aborts it after the close
    timeout and the client has read every byte the server ever sent it.
    """
    server = await make_server(close_timeout=0.3)
    visitor, visitor_leg, call_id = await start_leg(server, Role.VISITOR)
    resident, resident_leg, _ = await start_leg(server, Role.RESIDENT, uuid.UUID(call_id), on_hangup="ignore")
    await more_frames(resident, 3)
    reset_at = reactor.seconds()
    visitor.reset()
    await within(resident.hangup_received, "the session hangup")
    delay = resident.times[-1] - reset_at
    assert delay <= 0.100, f"hangup {1000 * delay:.1f} ms after the reset"
    assert await within(visitor_leg.whenGone(), "the visitor leg to go") is CloseReason.PEER_RESET
    assert await within(resident_leg.whenGone(), "the resident leg to go") is CloseReason.HANGUP_TIMEOUT
    await within(resident.closed, "the connection to close")
    assert resident.ended_with_single_hangup()
    assert resident.bytes_after_hangup == 0
    assert len(server.registry) == 0
    assert server.registry.session(call_id) is None
    [ended] = [event for event in logs.ended(call_id) if event["role"] is Role.RESIDENT]
    assert ended["cause"].value == "session"
    assert ended["reason"] is CloseReason.HANGUP_TIMEOUT


@pytest_twisted.ensureDeferred
async def test_on_leg_end_keep_leaves_the_other_leg_live(make_server: MakeServer, logs: LogCapture) -> None:
    server = await make_server(on_leg_end="keep")
    visitor, visitor_leg, call_id = await start_leg(server, Role.VISITOR)
    resident, resident_leg, _ = await start_leg(server, Role.RESIDENT, uuid.UUID(call_id))
    visitor.reset()
    assert await within(visitor_leg.whenGone(), "the visitor leg to go") is CloseReason.PEER_RESET
    await more_frames(resident, 10, what="silence after the visitor left")
    assert resident.hangup_frames == 0
    assert set(resident.encoded()) == {SILENCE}
    assert resident_leg.live and resident_leg.hangup_cause is None
    assert server.registry.call(call_id) == [resident_leg]
    resident.close()
    assert await within(resident_leg.whenGone(), "the resident leg to go") is CloseReason.PEER_CLOSED
    assert server.registry.session(call_id) is None


# 4. Hangup after playout


@pytest_twisted.ensureDeferred
async def test_hangup_after_playout_over_http(make_server: MakeServer, logs: LogCapture) -> None:
    """
    Every queued frame reaches the leg before the single C{00 00 00}. The
    client never closes, so it reads everything the server sends until the
    close timeout aborts the leg.
    """
    server = await make_server(close_timeout=0.5)
    client, leg, call_id = await start_leg(server, Role.VISITOR, on_hangup="ignore")
    prompt = struct.pack("<1600h", *range(1, 1601))  # 10 frames of distinct non-zero samples
    expected = slin_frames(prompt)
    status, body, _ = await post_json(f"{server.url}/calls/{call_id}/play?role=visitor", data=prompt, headers=L16_8K)
    assert status == 200, body
    assert body["legs"] == [{"role": "visitor", "queued_ms": 200, "dropped_frames": 0}]
    status, body, _ = await post_json(
        f"{server.url}/calls/{call_id}/hangup?role=visitor&after_playout=true&wait=true"
    )
    assert status == 200, body
    assert body["legs"] == [{"role": "visitor", "result": "hangup_after_playout", "reason": "hangup_timeout"}]
    await within(client.closed, "the connection to close")
    assert client.ended_with_single_hangup()
    assert client.encoded()[-11:] == expected + [HANGUP_FRAME]
    assert set(client.encoded()[:-11]) <= {SILENCE}
    assert client.heard() == expected
    [ended] = logs.ended(call_id)
    assert ended["cause"] is HangupCause.API
    assert leg.close_reason is CloseReason.HANGUP_TIMEOUT
    assert len(server.registry) == 0


# 5. /play errors


async def assert_play_error(
    url: str, status: int, code: str | None, data: bytes, content_type: str
) -> None:
    got, body, response = await post_json(url, data=data, headers={"Content-Type": content_type})
    assert got == status, body
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert list(body) == ["error"] and set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


@pytest_twisted.ensureDeferred
async def test_play_errors_over_http(make_server: MakeServer, logs: LogCapture) -> None:
    server = await make_server()
    client, leg, call_id = await start_leg(server, Role.VISITOR)
    play = f"{server.url}/calls/{call_id}/play"
    await assert_play_error(play, 400, "wrong_rate", bytes(320), "audio/L16;rate=16000")
    await assert_play_error(play, 400, "bad_content_type", bytes(320), "audio/wav")
    await assert_play_error(play, 400, "bad_audio_length", b"\x01" * 321, "audio/L16;rate=8000")
    await assert_play_error(
        f"{server.url}/calls/{uuid.uuid4()}/play", 404, "unknown_call", b"\x01\x00" * 160, "audio/L16;rate=8000"
    )
    assert leg.queued_ms == 0 and leg.queue.dropped == 0
    assert set(client.encoded()) <= {SILENCE}

    small = await make_server(max_queue_ms=100)
    small_client, small_leg, small_call = await start_leg(small, Role.VISITOR)
    await assert_play_error(
        f"{small.url}/calls/{small_call}/play", 413, "audio_too_long", b"\x01\x00" * 1600, "audio/L16;rate=8000"
    )
    assert small_leg.queued_ms == 0
    client.close()
    small_client.close()
    await within(gatherResults([leg.whenGone(), small_leg.whenGone()]), "both legs to go")


# 6. Echo


@pytest_twisted.ensureDeferred
async def test_echo_flow_returns_audio_to_the_same_leg(make_server: MakeServer, logs: LogCapture) -> None:
    server = await make_server(flow="echo")
    client, leg, call_id = await start_leg(server, Role.VISITOR)
    other, other_leg, _ = await start_leg(server, Role.RESIDENT, uuid.UUID(call_id))
    sent = [audio_frame(3, seq) for seq in range(25)]
    await send_paced(client, sent)
    await until(lambda: len(client.heard()) >= len(sent), what="the echo")
    assert client.heard() == sent
    assert set(client.encoded()) <= {SILENCE, *sent}
    assert other.heard() == []  # echo is to the sender only
    client.close()
    await within(gatherResults([leg.whenGone(), other_leg.whenGone()]), "both legs to go")


# 7. Silence


@pytest_twisted.ensureDeferred
async def test_silence_flow_forwards_nothing(make_server: MakeServer, logs: LogCapture) -> None:
    server = await make_server(flow="silence")
    visitor, visitor_leg, call_id = await start_leg(server, Role.VISITOR)
    resident, resident_leg, _ = await start_leg(server, Role.RESIDENT, uuid.UUID(call_id))
    sent = [audio_frame(4, seq) for seq in range(25)]
    await send_paced(visitor, sent)
    await until(lambda: visitor_leg.frames_in == 1 + len(sent), what="the server to read every frame")
    # Anything forwarded is written before the pacer's next frames to the resident.
    await more_frames(resident, 3)
    assert set(resident.encoded()) == {SILENCE}
    assert set(visitor.encoded()) == {SILENCE}
    visitor.close()
    await within(gatherResults([visitor_leg.whenGone(), resident_leg.whenGone()]), "both legs to go")


# 8. Custom flows by dotted path


@pytest_twisted.ensureDeferred
async def test_custom_flow_by_dotted_path(make_server: MakeServer, logs: LogCapture) -> None:
    flows_for_tests.EVENTS.clear()
    server = await make_server(flow="tests.flows_for_tests.Recorder")
    client, leg, call_id = await start_leg(server, Role.VISITOR)
    frame = audio_frame(5, 1)
    client.send(frame + encode_frame(Kind.DTMF, b"1"))
    await until(lambda: leg.dtmf == "1", what="the first digit")
    client.send(encode_frame(Kind.DTMF, b"#"))
    await within(client.hangup_received, "the hangup after #")
    assert await within(leg.whenGone(), "the leg to go") is CloseReason.HANGUP_RESET
    assert client.ended_with_single_hangup()
    assert leg.hangup_cause is HangupCause.API
    assert [event for event in flows_for_tests.EVENTS if event[1] == call_id] == [
        ("legJoined", call_id, "visitor", None),
        ("audioReceived", call_id, "visitor", frame),
        ("dtmfReceived", call_id, "visitor", "1"),
        ("dtmfReceived", call_id, "visitor", "#"),
        ("legEnded", call_id, "visitor", CloseReason.HANGUP_RESET),
    ]


@pytest_twisted.ensureDeferred
async def test_flow_exception_is_logged_and_the_call_goes_on(make_server: MakeServer, logs: LogCapture) -> None:
    """
    The flow's C{audioReceived} raises: the session logs it as a failure and
    the leg lives on (reads frames, hears silence, hangs up normally).

    The C{logs} fixture fails a test on any failure event, because none may
    appear in normal operation. Here the failure is the point, so it is
    checked and then removed from C{logs.events}; any other failure still
    fails the test.
    """
    server = await make_server(flow="tests.flows_for_tests.Exploding")
    client, leg, call_id = await start_leg(server, Role.VISITOR)
    client.send(audio_frame(6, 1) + encode_frame(Kind.DTMF, b"7"))
    await until(lambda: leg.dtmf == "7", what="the digit after the failing frame")
    [failure] = failures(logs, flows_for_tests.FlowBug)
    assert failure["call_id"] == call_id and failure["hook"] == "audioReceived"
    assert leg.live
    await more_frames(client, 5, what="silence after the flow failed")
    assert set(client.encoded()) == {SILENCE}
    status, body, _ = await post_json(f"{server.url}/calls/{call_id}/hangup?wait=true")
    assert status == 200
    assert body["legs"] == [{"role": "visitor", "result": "hangup_sent", "reason": "hangup_reset"}]
    assert client.ended_with_single_hangup()
    logs.events.remove(failure)


# 9. Queue bounds over HTTP


@pytest_twisted.ensureDeferred
async def test_play_queue_never_exceeds_max_queue_ms(make_server: MakeServer, logs: LogCapture) -> None:
    """
    With a 100 ms queue, 200 ms in one body is refused; two 100 ms bodies in a
    row are accepted, the second dropping the first's unplayed frames (the
    oldest): the queue stays within 100 ms and the leg hears the first body's
    played frames, then the whole second body.
    """
    server = await make_server(max_queue_ms=100)
    client, leg, call_id = await start_leg(server, Role.VISITOR)
    play = f"{server.url}/calls/{call_id}/play?role=visitor"
    status, body, _ = await post_json(play, data=b"\x01\x00" * 1600, headers=L16_8K)
    assert (status, body["error"]["code"]) == (413, "audio_too_long")

    first = struct.pack("<800h", *range(1, 801))
    second = struct.pack("<800h", *range(-1, -801, -1))
    status, one, _ = await post_json(play, data=first, headers=L16_8K)
    assert status == 200
    assert one["legs"] == [{"role": "visitor", "queued_ms": 100, "dropped_frames": 0}]
    status, two, _ = await post_json(play, data=second, headers=L16_8K)
    assert status == 200
    [answer] = two["legs"]
    dropped = answer["dropped_frames"]
    assert answer["queued_ms"] == 100  # full again, never more
    assert 0 <= dropped <= 5
    status, calls = await get_json(f"{server.url}/calls")
    snapshot = snapshot_of(calls, call_id, "visitor")
    assert snapshot["queued_ms"] <= 100
    assert snapshot["dropped_frames"] == dropped

    expected = slin_frames(first)[: 5 - dropped] + slin_frames(second)
    await until(lambda: len(client.heard()) >= len(expected), what="the prompts to play")
    await until(lambda: leg.queued_ms == 0)
    await more_frames(client, 2)
    assert client.heard() == expected
    status, calls = await get_json(f"{server.url}/calls")
    assert snapshot_of(calls, call_id, "visitor")["queued_ms"] == 0
    assert snapshot_of(calls, call_id, "visitor")["dropped_frames"] == dropped
    client.close()
    assert await within(leg.whenGone(), "the leg to go") is CloseReason.PEER_CLOSED
