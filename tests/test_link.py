"""
The media link: a call whose legs land on two instances is one bridged call
on the instance of its first leg. Real C{twistd -n audiohangup} children on
loopback sharing one real redis-server, fake Asterisk legs on each.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
import uuid
from pathlib import Path

import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from audiohangup.audio import SLIN
from audiohangup.cluster.directory import LegEntry
from audiohangup.cluster.link import HANDSHAKE_TIMEOUT, LinkServer
from audiohangup.cluster.linker import Linker, LinkFlow, NewcomerSide
from audiohangup.cluster.linkmessages import CONTROL, QUEUED, accepted, control, hello, read_control
from audiohangup.cluster.remoteleg import RemoteLeg
from audiohangup.flows import SilenceFlow
from audiohangup.interfaces import IRemoteLeg
from audiohangup.logs import iso_time
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.registry import Registry
from audiohangup.service import Config, build_service
from audiohangup.session import Session
from audiohangup.wire import Frame, FrameDecoder, Kind, encode_frame
from tests.conftest import until
from tests.fake_asterisk import FakeAsterisk
from tests.redis_server import RedisServer, free_port
from tests.test_cluster import HEARTBEAT, TOKEN, Instance, leg_on, request, wait_listed
from tests.test_recording import numbered, read_wav, ticks
from tests.twistd_child import Spawn, settle, start_server

FRAMES = 25
LINK_LISTENING = re.compile(r"\blink listening on 127\.0\.0\.1:(\d+)\s*$", re.M)


#: The media link on loopback: off by default (``--link none``), on in these tests.
LOOPBACK_LINK = "tcp:0:interface=127.0.0.1"


async def instance_with(spawn: Spawn, redis: RedisServer, name: str, *extra: str) -> Instance:
    """L{tests.test_cluster.instance}, with options of its own."""
    http = free_port()
    child, ports = await start_server(
        spawn, "--http", f"tcp:{http}:interface=127.0.0.1", "--call-records", "none",
        "--redis", redis.url, "--instance-id", name, "--advertise-url", f"http://127.0.0.1:{http}",
        "--heartbeat", str(HEARTBEAT), "--api-token", TOKEN, "--link", LOOPBACK_LINK, *extra,
    )
    return Instance(name, child, ports)


def link_port(at: Instance) -> int:
    found = LINK_LISTENING.findall(at.child.log)
    assert len(found) == 1, at.child.describe()
    return int(found[0])


def frames_of(tag: int) -> list[bytes]:
    """FRAMES distinct 20 ms slin frames, none of them silence."""
    return [encode_frame(Kind.SLIN, bytes([tag, n + 1]) * 160) for n in range(FRAMES)]


def heard(client: FakeAsterisk) -> list[bytes]:
    """The audio a leg was sent, its pacer's silence left out."""
    return [frame.encode() for frame in client.frames if frame.kind == Kind.SLIN and any(frame.payload)]


async def split_call(a: Instance, b: Instance, **options: object) -> tuple[uuid.UUID, FakeAsterisk, FakeAsterisk]:
    """The resident on B (the call's first leg, so B is home), then the visitor on A, linked to B."""
    call_id = uuid.uuid4()
    resident = await leg_on(b, "resident", call_id, **options)
    await wait_listed(a, {(str(call_id), "resident"): "b"})
    visitor = await leg_on(a, "visitor", call_id, **options)
    await until(lambda: f"{call_id} visitor linked from instance a to instance b" in a.child.log, 10, "A's link line")
    await until(lambda: f"{call_id} visitor leg joined over the link from instance a" in b.child.log, 10, "B's join")
    return call_id, visitor, resident


@pytest_twisted.ensureDeferred
async def test_split_call_is_bridged_byte_exact(spawn: Spawn, redis_server: RedisServer) -> None:
    """Visitor on A, resident on B: each hears the other's frames, byte for byte, in order."""
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b")
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    spoken, answered = frames_of(0x11), frames_of(0x22)
    for mine, theirs in zip(spoken, answered, strict=True):
        visitor.send(mine)
        resident.send(theirs)
        await deferLater(reactor, 0.02)
    await until(lambda: len(heard(resident)) >= FRAMES and len(heard(visitor)) >= FRAMES, 5, "the frames across")
    assert heard(resident) == spoken
    assert heard(visitor) == answered

    # The session is on B: a hangup sent there ends both legs with cause api.
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?wait=true")
    assert status == 200, body
    assert sorted(leg["role"] for leg in body["legs"]) == ["resident", "visitor"], body
    await settle(visitor.closed, "the visitor on A to close")
    await settle(resident.closed, "the resident on B to close")
    assert visitor.ended_with_single_hangup() and resident.ended_with_single_hangup()
    await until(lambda: f"{call_id} visitor hangup sent (cause api)" in a.child.log, 5, "A's hangup line")
    await until(lambda: f"{call_id} resident hangup sent (cause api)" in b.child.log, 5, "B's hangup line")
    # The remote leg's close reason is the one the real connection gave.
    real = re.search(rf"{call_id} visitor leg ended: (\w+)", a.child.log)
    assert real is not None
    await until(
        lambda: f"{call_id} visitor leg ended: {real.group(1)} " in b.child.log, 5, "B's remote leg ending as A's"
    )


@pytest_twisted.ensureDeferred
async def test_hangup_on_the_newcomers_instance(spawn: Spawn, redis_server: RedisServer) -> None:
    """A hangup of the visitor sent to A: the visitor gets cause api, and its session on B ends the resident (session)."""
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b")
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    status, body, _ = await request("POST", f"{a.url}/calls/{call_id}/hangup?role=visitor")
    assert (status, body["legs"][0]["result"]) == (200, "hangup_sent"), body
    await settle(visitor.closed, "the visitor on A to close")
    await settle(resident.closed, "the resident on B to close")
    assert visitor.ended_with_single_hangup() and resident.ended_with_single_hangup()
    await until(lambda: f"{call_id} visitor hangup sent (cause api)" in a.child.log, 5, "A's hangup line")
    await until(lambda: f"{call_id} resident hangup sent (cause session)" in b.child.log, 5, "B's hangup line")


@pytest_twisted.ensureDeferred
async def test_killed_home_hangs_up_the_newcomer(spawn: Spawn, redis_server: RedisServer) -> None:
    """SIGKILL B mid-call: the visitor on A is hung up (cause link) within a second, logged once with both ids."""
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b")
    call_id, visitor, _ = await split_call(a, b, on_hangup="close")
    visitor.send(frames_of(0x33)[0])
    b.child.signal("KILL")
    killed = reactor.seconds()
    await settle(visitor.hangup_received, "00 00 00 on A's visitor", timeout=5)
    assert reactor.seconds() - killed < 1.0
    await settle(visitor.closed, "the visitor on A to close")
    assert visitor.ended_with_single_hangup()
    await until(lambda: f"{call_id} visitor hangup sent (cause link)" in a.child.log, 5, "A's hangup line")
    failed = [line for line in a.child.log.splitlines() if "link from instance a to instance b" in line]
    assert len(failed) == 1 and "failed" in failed[0], failed
    assert 'audiohangup_hangups_sent_total{cause="link"} 1.0' in await request_text(f"{a.url}/metrics")


@pytest_twisted.ensureDeferred
async def test_a_link_refused_or_missing_hangs_up_the_newcomer(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    The home refuses the link (its visitors carry slin16, the newcomer's
    slin), or has none (--link none): the visitor on A is hung up (cause
    link) at once, never left unbridged, and A says why once.
    """
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b", "--visitor-audio", "slin16")
    c = await instance_with(spawn, redis_server, "c", "--link", "none")
    for home, why in ((b, "refused: its leg carries slin, this instance's visitor legs slin16"), (c, "has no link")):
        call_id = uuid.uuid4()
        await leg_on(home, "resident", call_id, on_hangup="close")
        await wait_listed(a, {(str(call_id), "resident"): home.name})
        visitor = await leg_on(a, "visitor", call_id, on_hangup="close")
        await settle(visitor.hangup_received, "00 00 00 on A's visitor", timeout=5)
        line = f"{call_id} visitor hangup sent (cause link)"
        await until(lambda line=line: line in a.child.log, 5, "A's hangup line")
        said = [line for line in a.child.log.splitlines() if str(call_id) in line and why in line]
        assert len(said) == 1, a.child.log


@pytest_twisted.ensureDeferred
async def test_the_homes_flow_runs_the_remote_leg(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    The home runs --flow echo: the visitor on A hears its own frames back,
    queued on B by the flow and paced on A.
    """
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b", "--flow", "echo")
    _, visitor, _ = await split_call(a, b, on_hangup="close")
    spoken = frames_of(0x44)
    for frame in spoken:
        visitor.send(frame)
        await deferLater(reactor, 0.02)
    await until(lambda: len(heard(visitor)) >= FRAMES, 5, "the echo")
    assert heard(visitor) == spoken


@pytest_twisted.ensureDeferred
async def test_a_stopping_home_hangs_up_the_newcomer(spawn: Spawn, redis_server: RedisServer) -> None:
    """SIGTERM B: its drain hangs up its legs, the remote one too (cause shutdown, on A), bounded."""
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b")
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    b.child.signal("TERM")
    stopped = reactor.seconds()
    await settle(visitor.hangup_received, "00 00 00 on A's visitor", timeout=5)
    await settle(resident.hangup_received, "00 00 00 on B's resident", timeout=5)
    assert reactor.seconds() - stopped < 1.0
    await settle(visitor.closed, "the visitor on A to close")
    assert visitor.ended_with_single_hangup()
    await until(lambda: f"{call_id} visitor hangup sent (cause shutdown)" in a.child.log, 5, "A's hangup line")
    await b.child.exit()
    assert f"{call_id} visitor leg ended: hangup_clean" in b.child.log, b.child.log


class _Client(Protocol):
    """A client of the link port that is not an instance: its hello is signed with the wrong token."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.decoder = FrameDecoder()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            message = read_control(frame)
            if message is not None and message.get("type") == "challenge":
                assert self.transport is not None
                self.transport.write(hello("not-" + TOKEN, message["nonce"], "11" * 32, "a", str(uuid.uuid4()), "visitor", "slin"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_client_that_is_not_an_instance_is_refused(spawn: Spawn, redis_server: RedisServer) -> None:
    """A wrong HMAC: the client gets the challenge only, is closed, and counted; no leg joins."""
    b = await instance_with(spawn, redis_server, "b")
    client = _Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", link_port(b)), client)
    await settle(client.closed, "the link port to close the client")
    assert [frame.kind for frame in client.frames] == [CONTROL], client.frames
    assert json.loads(client.frames[0].payload)["type"] == "challenge"
    response = await request_text(f"{b.url}/metrics")
    assert 'audiohangup_connections_refused_total{listener="link",reason="not_an_instance"} 1.0' in response
    status, body, _ = await request("GET", f"{b.url}/calls")
    assert (status, body["calls"]) == (200, []), body


async def request_text(url: str) -> str:
    import treq

    from tests.test_cluster import AUTHORIZED

    response = await treq.get(url, persistent=False, timeout=10, headers=AUTHORIZED)
    text: str = await response.text()
    return text


# The home's side, deterministic: a StringTransport for the link, a Clock.


class _HomeSide(SynchronousTestCase):
    """A link listener's side of one link, on a StringTransport and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry()
        self.metrics = CollectorRegistry()
        self.server = LinkServer(
            self.registry, "b", TOKEN, {role: SLIN for role in Role}, self.clock, close_timeout=1.0,
            metrics=self.metrics,
        )
        self.side = self.server.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.side.makeConnection(self.transport)
        self.call_id = str(uuid.uuid4())

    def sent(self) -> list[Frame]:
        frames = FrameDecoder().feed(self.transport.value())
        self.transport.clear()
        return frames

    def nonce(self) -> str:
        (challenge,) = self.sent()
        message = read_control(challenge)
        assert message is not None and message["type"] == "challenge" and message["instance_id"] == "b"
        return str(message["nonce"])

    def refused(self, reason: str) -> float | None:
        return self.metrics.get_sample_value(
            "audiohangup_connections_refused_total", {"listener": "link", "reason": reason}
        )

    def join(self) -> RemoteLeg:
        self.side.dataReceived(hello(TOKEN, self.nonce(), "22" * 32, "a", self.call_id, "visitor", "slin"))
        (answer,) = self.sent()
        self.assertEqual(answer.encode(), accepted(TOKEN, "22" * 32, "b", self.call_id, "visitor"))
        leg = self.registry.get(self.call_id, Role.VISITOR)
        assert isinstance(leg, RemoteLeg)
        return leg


class HomeSideTests(_HomeSide):
    """What the link listener does with a hello, the frames after it, and the link's end."""

    def test_a_signed_hello_joins_a_remote_leg(self) -> None:
        """The remote leg is the session's visitor, out of the directory's reach, and what it hears crosses the link."""
        leg = self.join()
        self.assertTrue(verifyObject(IRemoteLeg, leg))
        self.assertEqual((leg.instance_id, leg.peer, leg.live), ("a", "a@127.0.0.1:40000", True))
        frame = encode_frame(Kind.SLIN, b"\x01\x02" * 160)
        leg.forwardBytes(frame)
        self.assertEqual(self.transport.value(), frame)
        self.transport.clear()
        leg.play(b"\x00\x00" * 160)
        self.assertEqual([f.kind for f in self.sent()], [QUEUED])

    def test_a_wrong_mac_is_refused_and_counted(self) -> None:
        """Signed with another token: nothing but the challenge, the connection aborted, the refusal counted."""
        self.side.dataReceived(hello("not-" + TOKEN, self.nonce(), "22" * 32, "a", self.call_id, "visitor", "slin"))
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.refused("not_an_instance"), 1.0)
        self.assertEqual(self.registry.calls(), {})

    def test_a_replayed_hello_is_refused(self) -> None:
        """A hello signed for another nonce (another link's) does not open this one."""
        self.nonce()
        self.side.dataReceived(hello(TOKEN, "00" * 32, "22" * 32, "a", self.call_id, "visitor", "slin"))
        self.assertEqual(self.refused("not_an_instance"), 1.0)

    def test_no_hello_in_time(self) -> None:
        self.clock.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.refused("timeout"), 1.0)

    def test_the_real_legs_end_is_the_remote_legs(self) -> None:
        """The instance holding the connection says how it ended: that is the remote leg's close reason."""
        leg = self.join()
        gone = leg.hangup(HangupCause.API)
        self.assertEqual(
            read_control(self.sent()[0]), {"type": "hangup", "cause": "api", "after_playout": False}
        )
        self.side.dataReceived(control({"type": "ended", "reason": "hangup_reset", "cause": "api"}))
        self.assertEqual(self.successResultOf(gone), CloseReason.HANGUP_RESET)
        self.assertEqual(self.registry.calls(), {})

    def test_the_real_legs_cause_is_the_remote_legs(self) -> None:
        """Its instance hung the real leg up (max_duration): the remote leg's record says so."""
        leg = self.join()
        self.side.dataReceived(control({"type": "ended", "reason": "hangup_clean", "cause": "max_duration"}))
        self.assertEqual((leg.close_reason, leg.hangup_cause), (CloseReason.HANGUP_CLEAN, HangupCause.MAX_DURATION))

    def test_a_broken_link_ends_the_leg_as_link_lost(self) -> None:
        leg = self.join()
        self.side.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(leg.close_reason, CloseReason.LINK_LOST)
        self.assertEqual(len(self.registry), 0)

    def test_a_newcomer_that_stops_reading_is_cut(self) -> None:
        """The transport's buffer is full (the other instance stopped reading): the link is cut, the leg link_lost."""
        leg = self.join()
        self.assertIs(self.transport.producer, self.side)
        self.side.pauseProducing()
        self.assertTrue(self.transport.disconnecting)
        self.side.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(leg.close_reason, CloseReason.LINK_LOST)

    def test_a_hangup_without_an_answer_is_bounded(self) -> None:
        """The other instance never says the leg ended: after its close timeout and a second, the link is cut."""
        leg = self.join()
        gone = leg.hangup(HangupCause.SESSION)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(gone), CloseReason.HANGUP_TIMEOUT)
        self.assertTrue(self.transport.disconnecting)


class _Route:
    """A local leg the remote one is bridged to: what it is given."""

    def __init__(self) -> None:
        self.forwarded: list[bytes] = []

    def forwardBytes(self, data: bytes) -> None:
        self.forwarded.append(data)

    def forward(self, frame: Frame) -> None:
        self.forwarded.append(frame.encode())


class _AudioTap:
    """A tap on the remote leg: what it hears the real leg say."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.digits: list[str] = []

    def legAudio(self, frame: Frame) -> None:
        self.frames.append(frame)

    def legDtmf(self, digit: str) -> None:
        self.digits.append(digit)

    def legHeard(self, data: bytes) -> None:
        pass


def audio_frames(count: int, kind: int = Kind.SLIN) -> list[bytes]:
    """C{count} 20 ms slin frames, each its own."""
    return [encode_frame(kind, bytes([n + 1]) * 320) for n in range(count)]


def mimics(count: int) -> list[bytes]:
    """Slin frames whose payload starts with a slin frame's header: what the decoder alone can tell apart."""
    return [encode_frame(Kind.SLIN, struct.pack("!BH", Kind.SLIN, 320) + bytes([n + 1]) * 317) for n in range(count)]


def cut(stream: bytes, *offsets: int) -> list[bytes]:
    """C{stream} in chunks ending at C{offsets}, and the rest."""
    points = [0, *offsets, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


class HomeSideFastPathTests(_HomeSide):
    """
    Whole frames of the remote leg's own audio from the link go to its
    bridged leg as they came, unparsed; anything else through the decoder,
    with the same outcome and the same counts.
    """

    def bridged(self) -> tuple[RemoteLeg, _Route]:
        leg = self.join()
        route = _Route()
        leg.bridgeTo(route)  # type: ignore[arg-type]
        self.clock.advance(5.0)
        return leg, route

    def feed(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.side.dataReceived(chunk)

    def test_whole_frames_go_as_they_came(self) -> None:
        """One frame a read, then three in one: each forwarded alone, byte for byte, counted."""
        leg, route = self.bridged()
        frames = audio_frames(4)
        self.feed([frames[0], b"".join(frames[1:])])
        self.assertEqual(route.forwarded, frames)
        self.assertEqual((leg.frames_in, leg.bytes_in, leg.last_frame_at), (4, 4 * 323, 5.0))
        self.assertEqual(self.side.decoder.pending, b"")

    def test_frames_split_at_odd_offsets(self) -> None:
        """A frame in pieces, a chunk ending inside the next frame's header: the decoder joins them, none lost."""
        leg, route = self.bridged()
        frames = audio_frames(3)
        stream = b"".join(frames)
        self.feed(cut(stream, 1, 2, 100, 323 + 2, 323 + 3, 2 * 323 + 200))
        self.assertEqual(route.forwarded, frames)
        self.assertEqual((leg.frames_in, leg.bytes_in), (3, 3 * 323))
        # Whole again: the next frame takes the fast path.
        self.feed(audio_frames(1))
        self.assertEqual(len(route.forwarded), 4)

    def test_a_chunk_that_looks_whole_after_a_piece(self) -> None:
        """Audio that sounds like a header, read a header off: each chunk looks whole, and is not."""
        leg, route = self.bridged()
        frames = mimics(2)
        self.feed([frames[0][:3], frames[0][3:] + frames[1][:3], frames[1][3:]])
        self.assertEqual((route.forwarded, leg.frames_in), (frames, 2))

    def test_a_control_frame_among_audio(self) -> None:
        """The leg's end between two frames: the first is bridged, the leg ends, the link closes, the rest is dropped."""
        leg, route = self.bridged()
        first, second = audio_frames(2)
        ended = control({"type": "ended", "reason": "peer_hangup", "cause": None})
        self.feed([first + ended + second])
        self.assertEqual(route.forwarded, [first])
        self.assertEqual(leg.close_reason, CloseReason.PEER_HANGUP)
        self.assertTrue(self.transport.disconnecting)

    def test_dtmf_among_audio(self) -> None:
        leg, route = self.bridged()
        first, second = audio_frames(2)
        self.feed([first + encode_frame(Kind.DTMF, b"5") + second])
        self.assertEqual((route.forwarded, leg.dtmf, leg.frames_in), ([first, second], "5", 3))

    def test_a_tap_hears_every_frame(self) -> None:
        """With a tap (a recording, a stream) the frames are parsed, so the tap hears them all."""
        leg, _ = self.bridged()
        tap = _AudioTap()
        leg.taps.append(tap)  # type: ignore[arg-type]
        frames = audio_frames(3)
        self.feed([frames[0], frames[1] + frames[2]])
        self.assertEqual([frame.encode() for frame in tap.frames], frames)
        self.assertEqual(leg.frames_in, 3)

    def test_not_bridged_after_a_hangup(self) -> None:
        """A leg hung up (closing): its frames are counted, not bridged."""
        leg, route = self.bridged()
        leg.hangup(HangupCause.API)
        self.feed(audio_frames(2))
        self.assertEqual((route.forwarded, leg.frames_in), ([], 2))

    def test_another_kind_of_audio(self) -> None:
        """Audio not of the leg's own kind goes through the session's flow, never unparsed to the route."""
        leg, route = self.bridged()
        frames = audio_frames(2, Kind.SLIN16)
        self.feed(frames)
        self.assertEqual((route.forwarded, leg.frames_in), ([], 2))


class _Leg:
    """What the newcomer's side uses of its leg."""

    def __init__(self, call_id: str) -> None:
        self.call_id, self.role, self.format = call_id, Role.VISITOR, SLIN
        self.live = True
        self.close_reason: CloseReason | None = None
        self.hangup_cause: HangupCause | None = None
        self.hangups: list[HangupCause] = []
        self.forwarded: list[bytes] = []
        self.queued: list[bytes] = []
        self.route: object = None

    def hangup(self, cause: HangupCause) -> None:
        self.hangups.append(cause)

    def forwardBytes(self, data: bytes) -> None:
        self.forwarded.append(data)

    def queueFrames(self, frames: list[bytes]) -> int:
        self.queued += frames
        return 0

    def bridgeTo(self, other: object) -> None:
        self.route = other


class _NewcomerSide(SynchronousTestCase):
    """A newcomer's side of one link, for a fake leg, on a StringTransport."""

    def setUp(self) -> None:
        self.call_id = str(uuid.uuid4())
        self.registry = Registry()
        self.leg = _Leg(self.call_id)
        self.registry._sessions[self.call_id] = Session(self.call_id, SilenceFlow())
        linker = Linker.__new__(Linker)
        linker.registry, linker.reactor, linker.token = self.registry, Clock(), TOKEN
        linker.directory = type("D", (), {"instance_id": "a"})()  # type: ignore[assignment]
        self.side = NewcomerSide(linker, self.leg, "b", "127.0.0.1:1")  # type: ignore[arg-type]
        self.transport = StringTransport()
        self.side.makeConnection(self.transport)

    def handshake(self, signer: str = TOKEN) -> None:
        self.side.dataReceived(control({"type": "challenge", "instance_id": "b", "nonce": "33" * 32}))
        (hello_frame,) = FrameDecoder().feed(self.transport.value())
        self.transport.clear()
        message = read_control(hello_frame)
        assert message is not None
        self.side.dataReceived(accepted(signer, message["nonce"], "b", self.call_id, "visitor"))


class NewcomerSideTests(_NewcomerSide):
    """The newcomer's side: it checks the home, takes what the home sends, and hangs up when the link fails."""

    def test_linked(self) -> None:
        """Accepted: the session is handed over, frames and queued frames from the home reach the leg."""
        self.handshake()
        self.assertIsInstance(self.registry.session(self.call_id).flow, LinkFlow)  # type: ignore[union-attr]
        self.assertIsNotNone(self.leg.route)
        audio = encode_frame(Kind.SLIN, b"\x05" * 320)
        self.side.dataReceived(audio + encode_frame(QUEUED, audio))
        self.assertEqual((self.leg.forwarded, self.leg.queued), ([audio], [audio]))
        self.side.dataReceived(control({"type": "hangup", "cause": "api", "after_playout": False}))
        self.assertEqual(self.leg.hangups, [HangupCause.API])

    def test_a_home_without_the_token(self) -> None:
        """An acceptance not signed by the control token: the leg is hung up (cause link), nothing crosses."""
        self.handshake("not-" + TOKEN)
        self.assertEqual(self.leg.hangups, [HangupCause.LINK])
        self.assertTrue(self.transport.disconnecting)
        self.assertIsInstance(self.registry.session(self.call_id).flow, SilenceFlow)  # type: ignore[union-attr]

    def test_a_broken_link_hangs_up_once(self) -> None:
        self.handshake()
        self.side.connectionLost(Failure(ConnectionLost()))
        self.side.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.leg.hangups, [HangupCause.LINK])

    def test_a_home_that_stops_reading_fails_the_link(self) -> None:
        self.handshake()
        self.assertIs(self.transport.producer, self.side)
        self.side.pauseProducing()
        self.assertEqual(self.leg.hangups, [HangupCause.LINK])

    def test_the_legs_end_is_told(self) -> None:
        """The leg ended: the home hears how, and the link's close then hangs up nothing."""
        self.handshake()
        self.leg.close_reason, self.leg.hangup_cause = CloseReason.PEER_HANGUP, None
        self.side.legGone()
        (ended,) = FrameDecoder().feed(self.transport.value())
        self.assertEqual(read_control(ended), {"type": "ended", "reason": "peer_hangup", "cause": None})
        self.side.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.leg.hangups, [])


class NewcomerSideFastPathTests(_NewcomerSide):
    """What the home sends: whole frames of the leg's own audio go to the leg as they came; the rest decoded."""

    def test_whole_frames_go_as_they_came(self) -> None:
        self.handshake()
        frames = audio_frames(4)
        self.side.dataReceived(frames[0])
        self.side.dataReceived(b"".join(frames[1:]))
        self.assertEqual(self.leg.forwarded, frames)
        self.assertEqual(self.side.decoder.pending, b"")

    def test_frames_split_at_odd_offsets(self) -> None:
        self.handshake()
        frames = audio_frames(3)
        for chunk in cut(b"".join(frames), 2, 3, 322, 324, 2 * 323 + 1):
            self.side.dataReceived(chunk)
        self.side.dataReceived(frames[0])
        self.assertEqual(self.leg.forwarded, [*frames, frames[0]])

    def test_a_chunk_that_looks_whole_after_a_piece(self) -> None:
        self.handshake()
        frames = mimics(2)
        for chunk in (frames[0][:3], frames[0][3:] + frames[1][:3], frames[1][3:]):
            self.side.dataReceived(chunk)
        self.assertEqual(self.leg.forwarded, frames)

    def test_control_frames_among_audio(self) -> None:
        """A hangup between bridged frames, audio of another kind: each taken for what it is, in order."""
        self.handshake()
        first, second = audio_frames(2)
        (other,) = audio_frames(1, Kind.SLIN16)
        hangup = control({"type": "hangup", "cause": "api", "after_playout": False})
        self.side.dataReceived(first + hangup + other + second)
        self.assertEqual((self.leg.forwarded, self.leg.hangups), ([first, other, second], [HangupCause.API]))

    def test_nothing_before_the_acceptance(self) -> None:
        """Audio before the home accepted the leg is not the home's: dropped, as ever."""
        self.side.dataReceived(audio_frames(1)[0])
        self.assertEqual(self.leg.forwarded, [])

    def test_nothing_once_done(self) -> None:
        """The leg ended: what still arrives is not written to it."""
        self.handshake()
        self.side.legGone()
        self.side.dataReceived(b"".join(audio_frames(2)))
        self.assertEqual(self.leg.forwarded, [])


class _Directory:
    """The directory as the linker asks it: the call's legs, in turn, and an instance's link."""

    instance_id = "a"
    heartbeat = 2.0

    def __init__(self, *answers: dict[str, LegEntry]) -> None:
        self.answers = list(answers)
        self.link = ""

    async def owners(self, call_id: str) -> dict[str, LegEntry]:
        return self.answers.pop(0)

    async def link_of(self, instance_id: str) -> str | None:
        return self.link


class LinkerTests(SynchronousTestCase):
    """When a leg that starts here goes to its session elsewhere."""

    def setUp(self) -> None:
        self.call_id = str(uuid.uuid4())
        self.clock = Clock()
        self.registry = Registry()
        self.leg = _Leg(self.call_id)
        self.leg.connected_at = 100.0  # type: ignore[attr-defined]
        session = self.registry._sessions[self.call_id] = Session(self.call_id, SilenceFlow())
        session.legs[Role.VISITOR] = self.leg  # type: ignore[assignment]

    def entry(self, started: float) -> dict[str, LegEntry]:
        return {"resident": LegEntry(self.call_id, "resident", "b", "http://b", iso_time(started))}

    def linker(self, directory: _Directory) -> Linker:
        return Linker(directory, self.registry, self.clock, TOKEN)  # type: ignore[arg-type]

    def test_first_leg_elsewhere(self) -> None:
        """The resident started earlier on B, which has no link: the visitor is hung up (cause link)."""
        self.linker(_Directory(self.entry(99.0))).legStarted(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.leg.hangups, [HangupCause.LINK])

    def test_first_leg_here(self) -> None:
        """The resident on B started later: B links to here; this leg stays."""
        self.linker(_Directory(self.entry(101.0))).legStarted(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.leg.hangups, [])

    def test_alone_then_a_heartbeat_later_found(self) -> None:
        """Two legs at once may miss each other's entries: a leg still alone looks once more, a heartbeat later."""
        directory = _Directory({}, self.entry(99.0))
        self.linker(directory).legStarted(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.leg.hangups, [])
        self.clock.advance(directory.heartbeat)
        self.assertEqual(self.leg.hangups, [HangupCause.LINK])
        self.assertEqual(self.clock.getDelayedCalls(), [])


@pytest_twisted.ensureDeferred
async def test_the_home_records_the_split_call(spawn: Spawn, redis_server: RedisServer, tmp_path: Path) -> None:
    """--record-every-call on the home: one WAV, the visitor (on A) in one channel, the resident in the other."""
    record = tmp_path / "recordings"
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b", "--record-every-call", "--recordings-dir", str(record))
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    for _ in range(25):
        visitor.send(encode_frame(Kind.SLIN, numbered(1111)))
        resident.send(encode_frame(Kind.SLIN, numbered(2222)))
        await deferLater(reactor, 0.02)
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?wait=true")
    assert status == 200, body
    await until(lambda: list(record.glob("*/*.wav")), 5, "the recording")
    [path] = list(record.glob("*/*.wav"))
    await until(lambda: struct.unpack_from("<I", path.read_bytes(), 40)[0] > 0, 5, "the recording's header")
    _, left, right = read_wav(path)
    assert 1111 in ticks(left) and 2222 not in ticks(left), ticks(left)
    assert 2222 in ticks(right) and 1111 not in ticks(right), ticks(right)


@pytest_twisted.ensureDeferred
async def test_a_call_hangup_on_the_newcomers_instance(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    The whole call hung up through A, which holds its visitor: the session
    lives on B, so B answers and hangs up both legs (cause api), the visitor
    through the link.
    """
    a = await instance_with(spawn, redis_server, "a")
    b = await instance_with(spawn, redis_server, "b")
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    status, body, response = await request("POST", f"{a.url}/calls/{call_id}/hangup?wait=true")
    assert status == 200, body
    assert [(leg["role"], leg["result"]) for leg in body["legs"]] == [
        ("visitor", "hangup_sent"), ("resident", "hangup_sent")
    ], body
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"]
    await settle(visitor.closed, "the visitor on A to close")
    await settle(resident.closed, "the resident on B to close")
    await until(lambda: f"{call_id} visitor hangup sent (cause api)" in a.child.log, 5, "A's hangup line")
    await until(lambda: f"{call_id} resident hangup sent (cause api)" in b.child.log, 5, "B's hangup line")


class LinkWarningTests(SynchronousTestCase):
    """A link on loopback while the other instances reach this one elsewhere is said at start-up."""

    def warnings(self, advertise_url: str, link: str = LOOPBACK_LINK) -> list[str]:
        config = Config(
            redis="redis://127.0.0.1:1/0", api_token=TOKEN, advertise_url=advertise_url, link=link, records="none",
        )
        return [w for w in build_service(config, reactor).warnings if "--link" in w]

    def test_loopback_link_for_another_host(self) -> None:
        [warning] = self.warnings("http://10.0.0.11:8080")
        self.assertIn("hung up (cause link)", warning)

    def test_no_warning_when_it_fits(self) -> None:
        self.assertEqual(self.warnings("http://127.0.0.1:8080"), [])
        self.assertEqual(self.warnings("http://10.0.0.11:8080", "tcp:0:interface=0.0.0.0"), [])
        self.assertEqual(self.warnings("http://10.0.0.11:8080", "none"), [])


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of C{name} in a /metrics page whose labels include C{labels}."""
    total = 0.0
    for line in text.splitlines():
        found = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if found and all(f'{key}="{value}"' in (found.group(1) or "") for key, value in labels.items()):
            total += float(found.group(2))
    return total


@pytest_twisted.ensureDeferred
async def test_the_home_counts_the_remote_leg_once(spawn: Spawn, redis_server: RedisServer, tmp_path: Path) -> None:
    """
    The call's legs, its records and its metrics are the home's (B), the
    visitor's there with the close reason of its real connection on A; A,
    which handed the visitor over, neither records nor counts it.
    """
    a = await instance_with(spawn, redis_server, "a", "--call-records", str(tmp_path / "a.db"))
    b = await instance_with(spawn, redis_server, "b", "--call-records", str(tmp_path / "b.db"))
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?wait=true")
    assert status == 200, body
    await settle(visitor.closed, "the visitor on A to close")
    await settle(resident.closed, "the resident on B to close")
    await until(lambda: f"{call_id} visitor leg ended: " in a.child.log, 5, "A's end line")  # A still logs it
    real = re.search(rf"{call_id} visitor leg ended: (\w+)", a.child.log)
    assert real is not None

    async def records(at: Instance) -> list[dict[str, object]]:
        status, body, _ = await request("GET", f"{at.url}/records?call_id={call_id}")
        assert status == 200, body
        return [record for record in body["records"] if record.get("ended_at") is not None]

    found: list[dict[str, object]] = []

    async def both_ended() -> bool:
        found[:] = await records(b)
        return len(found) == 2

    for _ in range(50):
        if await both_ended():
            break
        await deferLater(reactor, 0.1)
    assert sorted(record["role"] for record in found) == ["resident", "visitor"], found
    [remote] = [record for record in found if record["role"] == "visitor"]
    assert (remote["reason"], remote["cause"]) == (real.group(1), "api"), remote
    assert await records(a) == []

    home, newcomer = await request_text(f"{b.url}/metrics"), await request_text(f"{a.url}/metrics")
    assert metric_sum(home, "audiohangup_legs_started_total", role="visitor") == 1.0, home
    assert metric_sum(home, "audiohangup_legs_started_total") == 2.0, home
    assert metric_sum(home, "audiohangup_legs_ended_total") == 2.0, home
    assert metric_sum(home, "audiohangup_legs_ended_total", reason=real.group(1), cause="api") >= 1.0, home
    assert metric_sum(home, "audiohangup_hangups_sent_total", cause="api") == 2.0, home
    assert metric_sum(newcomer, "audiohangup_legs_started_total") == 0.0, newcomer
    assert metric_sum(newcomer, "audiohangup_legs_ended_total") == 0.0, newcomer
    assert metric_sum(newcomer, "audiohangup_hangups_sent_total") == 0.0, newcomer
    assert metric_sum(newcomer, "audiohangup_frames_received_total") > 0, newcomer  # its traffic stays its own


class _Told:
    """An observer that notes what it is told."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def legStarted(self, leg: object) -> None:
        self.told.append("started")

    def hangupSent(self, leg: object, cause: HangupCause) -> None:
        self.told.append(f"hangup {cause.value}")

    def legEnded(self, leg: object) -> None:
        self.told.append("ended")

    def callEnded(self, call_id: str) -> None:
        self.told.append("call ended")

    def connectionEnded(self, connection: object) -> None:
        self.told.append("connection ended")


class CountedOnceTests(SynchronousTestCase):
    """A leg handed over through the link is counted on its session's home, not by this instance's counters."""

    def setUp(self) -> None:
        self.registry = Registry()
        self.events = self.registry.events
        self.counter, self.other = _Told(), _Told()
        self.events.add(self.counter, counts=True)  # type: ignore[arg-type]
        self.events.add(self.other)  # type: ignore[arg-type]
        self.linker = Linker(_Directory(), self.registry, Clock(), TOKEN)  # type: ignore[arg-type]
        self.leg = _Leg(str(uuid.uuid4()))

    def test_held_until_decided_then_told_in_order(self) -> None:
        """Until the linker decides, the counters wait; a leg that stays is told to them as it happened."""
        self.events.legStarted(self.leg)  # type: ignore[arg-type]
        self.events.hangupSent(self.leg, HangupCause.LINK)  # type: ignore[arg-type]
        self.assertEqual((self.counter.told, self.other.told), ([], ["started", "hangup link"]))
        self.events.release(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.counter.told, ["started", "hangup link"])
        self.assertFalse(self.events.handOver(self.leg))  # type: ignore[arg-type]  # decided already
        self.events.legEnded(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.counter.told, ["started", "hangup link", "ended"])

    def test_handed_over(self) -> None:
        """Handed over: the counters hear nothing of the leg or its call, but for the link's own failure."""
        self.events.legStarted(self.leg)  # type: ignore[arg-type]
        self.assertTrue(self.events.handOver(self.leg))  # type: ignore[arg-type]
        self.events.hangupSent(self.leg, HangupCause.API)  # type: ignore[arg-type]
        self.events.hangupSent(self.leg, HangupCause.LINK)  # type: ignore[arg-type]
        self.events.legEnded(self.leg)  # type: ignore[arg-type]
        self.events.callEnded(self.leg.call_id)
        self.assertEqual(self.counter.told, ["hangup link"])
        self.assertEqual(self.other.told, ["started", "hangup api", "hangup link", "ended", "call ended"])
        self.events.callEnded(self.leg.call_id)  # the call id comes back, at home here: counted
        self.assertEqual(self.counter.told, ["hangup link", "call ended"])

    def test_ended_undecided_is_counted_here(self) -> None:
        self.events.legStarted(self.leg)  # type: ignore[arg-type]
        self.events.legEnded(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.counter.told, ["started", "ended"])

    def test_remote_legs_and_legs_without_a_linker_are_not_held(self) -> None:
        self.events.mayLeave = lambda leg: False
        self.events.legStarted(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.counter.told, ["started"])

    def test_the_linker_decides(self) -> None:
        """The call's first leg is here (the directory knows no other): the leg is released to the counters."""
        self.linker.directory = _Directory({})  # type: ignore[assignment]
        self.registry._sessions[self.leg.call_id] = Session(self.leg.call_id, SilenceFlow())
        self.leg.connected_at = 100.0  # type: ignore[attr-defined]
        self.leg.ended_at = None  # type: ignore[attr-defined]
        self.events.add(self.linker)
        self.events.legStarted(self.leg)  # type: ignore[arg-type]
        self.assertEqual(self.counter.told, ["started"])
