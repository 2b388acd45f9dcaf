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
from typing import Any

import pytest_twisted
import treq
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

from audiohangup.audio import SLIN, LegSettings, Playout
from audiohangup.cluster.directory import LegEntry
from audiohangup.cluster.link import HANDSHAKE_TIMEOUT, LinkServer
from audiohangup.cluster.linker import Linker, LinkFlow, NewcomerSide
from audiohangup.cluster.linkmessages import CONTROL, accepted, control, hello, read_control
from audiohangup.cluster.remoteleg import RemoteLeg
from audiohangup.flows import SilenceFlow
from audiohangup.interfaces import IPacedLeg, IRemoteLeg
from audiohangup.logs import iso_time
from audiohangup.pacer import Pacer
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
from tests.ws_app import App

FRAMES = 25
LINK_LISTENING = re.compile(r"\blink listening on 127\.0\.0\.1:(\d+)\s*$", re.M)


#: The media link on loopback, as by default; named, so the tests do not depend on the default.
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


async def heard_byte_exact(visitor: FakeAsterisk, resident: FakeAsterisk, visitor_tag: int, resident_tag: int) -> None:
    """Each leg sends FRAMES frames, paced; each hears the other's, byte for byte, in order."""
    spoken, answered = frames_of(visitor_tag), frames_of(resident_tag)
    for mine, theirs in zip(spoken, answered, strict=True):
        visitor.send(mine)
        resident.send(theirs)
        await deferLater(reactor, 0.02)
    await until(lambda: len(heard(resident)) >= FRAMES and len(heard(visitor)) >= FRAMES, 5, "the frames across")
    assert heard(resident) == spoken
    assert heard(visitor) == answered


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
    await heard_byte_exact(visitor, resident, 0x11, 0x22)

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
    queued and paced on B by the flow, forwarded by A.
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


class HomeSideCase(SynchronousTestCase):
    """The link listener with a Clock, its link a StringTransport: what the tests of the home's side share."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry()
        self.metrics = CollectorRegistry()
        self.pacer = Pacer(self.clock)
        self.server = LinkServer(
            self.registry, "b", TOKEN, {role: SLIN for role in Role}, self.clock, self.pacer,
            settings=LegSettings(close_timeout=1.0, max_queue_ms=200, playout_timeout=3.0), metrics=self.metrics,
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


class HomeSideTests(HomeSideCase):
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
        self.assertEqual(self.transport.value(), b"")  # queued here, for this instance's pacer
        self.clock.advance(0.02)
        self.assertEqual(self.sent(), [Frame(Kind.SLIN, b"\x00\x00" * 160)])

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


class _Heard:
    """A recorder's tap as the leg sees it: what was written to the leg."""

    def __init__(self) -> None:
        self.heard: list[bytes] = []

    def legHeard(self, data: bytes) -> None:
        self.heard.append(data)


def spoken(*values: int) -> list[bytes]:
    """Encoded slin frames, each of one sample value."""
    return [encode_frame(Kind.SLIN, struct.pack("<h", value) * 160) for value in values]


class RemoteLegPacingTests(HomeSideCase):
    """
    What the home plays to a remote leg (its queue, a media stream's feed)
    its own pacer paces, a frame per 20 ms, over the link as plain audio.
    """

    def sentKinds(self) -> list[tuple[int, bytes | dict[str, object] | None]]:
        """The frames sent since the last look: audio payloads, control messages."""
        return [
            (frame.kind, read_control(frame) if frame.kind == CONTROL else frame.payload) for frame in self.sent()
        ]

    def tick(self) -> list[bytes]:
        """One 20 ms tick of the pacer: the encoded frames it sent."""
        self.clock.advance(0.02)
        return [frame.encode() for frame in self.sent()]

    def test_a_paced_leg(self) -> None:
        leg = self.join()
        self.assertTrue(verifyObject(IPacedLeg, leg))
        self.assertEqual(len(self.pacer), 1)

    def test_queued_audio_is_paced_a_frame_a_tick(self) -> None:
        """Five frames: none at once, then one a tick, in order, heard by the recorder; then no silence."""
        leg = self.join()
        tap = _Heard()
        leg.addTap(tap, heard=True)  # type: ignore[arg-type]
        frames = spoken(1, 2, 3, 4, 5)
        self.assertEqual(leg.queueFrames(frames), 0)
        self.assertEqual((self.transport.value(), leg.queued_ms), (b"", 100))
        for n, frame in enumerate(frames):
            self.assertEqual(self.tick(), [frame])
            self.assertEqual(leg.queued_ms, 80 - 20 * n)
        self.assertEqual(tap.heard, frames)
        self.assertEqual(self.tick(), [])  # the newcomer's pacer fills the gaps, not this one

    def test_the_queue_is_bounded(self) -> None:
        """Beyond --max-queue-ms (200 ms here), the oldest frames go, and /play says how many."""
        leg = self.join()
        self.assertEqual(leg.play(b"\x01\x00" * 160 * 12), 2)
        self.assertEqual(leg.queued_ms, 200)

    def test_bridged_frames_wait_for_the_prompt(self) -> None:
        """A bridged frame while a prompt plays is dropped (the prompt has the floor), as on a local leg."""
        leg = self.join()
        bridged = spoken(9)[0]
        leg.forwardBytes(bridged)
        self.assertEqual(self.sent(), [Frame(Kind.SLIN, bridged[3:])])  # nothing queued: at once
        prompt = spoken(1, 2)
        leg.queueFrames(prompt)
        leg.forwardBytes(bridged)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.tick() + self.tick(), prompt)

    def test_a_feed_is_played(self) -> None:
        """A converse media stream's audio, with its mark: paced here, the mark answered after its frame."""
        leg = self.join()
        feed = Playout(50)
        leg.attachFeed(feed)
        marked: list[str] = []
        feed.push(spoken(7, 8))
        feed.mark(lambda: marked.append("played"))
        self.assertEqual(self.tick(), spoken(7))
        self.assertEqual(marked, [])
        self.assertEqual(self.tick(), spoken(8))
        self.assertEqual(marked, ["played"])

    def test_hangup_after_playout_waits_for_the_queue(self) -> None:
        """The queue plays out here, then a plain hangup goes, after the frames; the leg ends when its instance says."""
        leg = self.join()
        frames = spoken(1, 2, 3)
        leg.queueFrames(frames)
        gone = leg.hangupAfterPlayout(HangupCause.API)
        self.assertEqual((self.transport.value(), leg.live), (b"", True))
        self.assertEqual(self.tick() + self.tick(), frames[:2])
        self.assertNoResult(gone)
        self.clock.advance(0.02)
        self.assertEqual(
            self.sentKinds(),
            [(Kind.SLIN, frames[2][3:]), (CONTROL, {"type": "hangup", "cause": "api", "after_playout": False})],
        )
        self.assertEqual((leg.live, leg.hangup_cause, len(self.pacer)), (False, HangupCause.API, 0))
        self.side.dataReceived(control({"type": "ended", "reason": "hangup_clean", "cause": "api"}))
        self.assertEqual(self.successResultOf(gone), CloseReason.HANGUP_CLEAN)

    def test_hangup_after_playout_with_nothing_queued(self) -> None:
        leg = self.join()
        leg.hangupAfterPlayout(HangupCause.API)
        self.assertEqual(self.sentKinds(), [(CONTROL, {"type": "hangup", "cause": "api", "after_playout": False})])

    def test_a_playout_is_bounded(self) -> None:
        """An app that never stops: after the playout timeout (3 s here) the leg is hung up all the same."""
        leg = self.join()
        feed = Playout(1000)
        leg.attachFeed(feed)
        feed.push(spoken(*range(1, 501)))  # ten seconds
        leg.hangupAfterPlayout(HangupCause.SESSION)
        self.clock.pump([0.02] * 149)
        self.assertTrue(leg.live)
        self.clock.advance(0.02)
        self.assertEqual(self.sentKinds()[-1], (CONTROL, {"type": "hangup", "cause": "session", "after_playout": False}))
        self.assertEqual((leg.live, feed.frames), (False, 0))  # drained: the rest will never play

    def test_an_ended_leg_plays_nothing_more(self) -> None:
        """The real leg ended: the queue goes, the feed's marks are answered, the pacer forgets the leg."""
        leg = self.join()
        leg.queueFrames(spoken(1, 2))
        feed = Playout(50)
        leg.attachFeed(feed)
        marked: list[str] = []
        feed.push(spoken(3))
        feed.mark(lambda: marked.append("answered"))
        self.side.dataReceived(control({"type": "ended", "reason": "peer_hangup", "cause": None}))
        self.assertEqual((leg.queued_ms, marked, len(self.pacer)), (0, ["answered"], 0))
        self.assertEqual(leg.queueFrames(spoken(4)), 0)
        self.assertEqual(self.tick(), [])


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


class HomeSideFastPathTests(HomeSideCase):
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
        self.side.dataReceived(audio + encode_frame(0xF1, audio))  # an older home's queued frame: not played
        self.assertEqual((self.leg.forwarded, self.leg.queued), ([audio], []))
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


@pytest_twisted.ensureDeferred
async def test_the_newcomers_instance_passes_the_calls_routes_to_the_home(
    spawn: Spawn, redis_server: RedisServer, tmp_path: Path
) -> None:
    """
    /play, streams and recording of a linked call sent to A (the newcomer's
    instance) are answered by B, where the session lives, for the leg on A
    too: one place plays, streams and records the whole call.
    """
    from tests.ws_app import App

    app = await App().listen()
    try:
        a = await instance_with(spawn, redis_server, "a")
        b = await instance_with(spawn, redis_server, "b", "--recordings-dir", str(tmp_path / "recordings"))
        call_id, visitor, _ = await split_call(a, b, on_hangup="close")

        prompt = bytes([0x33, 0x44]) * 160 * 3  # three frames, none of them silence
        status, body, response = await request(
            "POST", f"{a.url}/calls/{call_id}/play?role=visitor", data=prompt,
            headers={"Content-Type": "audio/L16;rate=8000"},
        )
        assert status == 200, body
        assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"]
        await until(lambda: len([f for f in heard(visitor) if f[3:] == prompt[:320]]) == 3, 5, "the prompt on A")

        status, body, response = await request(
            "POST", f"{a.url}/calls/{call_id}/streams", json={"url": app.url("/{role}"), "mode": "listen"}
        )
        assert status == 201, body
        assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"]
        assert sorted(s["role"] for s in body["streams"]) == ["resident", "visitor"]
        await until(lambda: len([c for c in app.connections if c.events("start")]) == 2, 5, "both streams from B")

        for method in ("POST", "GET", "DELETE"):
            response = await treq.request(
                method, f"{a.url}/calls/{call_id}/recording", headers={"Authorization": f"Bearer {TOKEN}"},
                persistent=False, timeout=10,
            )
            assert response.code in (200, 201), (method, await response.text())
            assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"], method
            await response.content()
        assert list((tmp_path / "recordings").glob("*/*.wav")), "the recording is B's"
    finally:
        await app.close()


@pytest_twisted.ensureDeferred
async def test_a_tls_link(spawn: Spawn, redis_server: RedisServer, tmp_path: Path) -> None:
    """
    --link ssl:... on both: the split call crosses over TLS, verified under
    --link-ca, byte-exact. A newcomer that does not trust the home's
    certificate, or a TLS instance whose home's link is plain, hangs its leg
    up (cause link) rather than send its audio unverified or in the clear.
    """
    from tests.tls import self_signed

    certificate = self_signed(tmp_path)
    tls = ("--link", certificate.endpoint(), "--link-ca", str(certificate.cert))
    a = await instance_with(spawn, redis_server, "a", *tls)
    b = await instance_with(spawn, redis_server, "b", *tls)
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    assert re.search(rf"{call_id} visitor linked from instance a to instance b at tls:127\.0\.0\.1:\d+", a.child.log)
    await heard_byte_exact(visitor, resident, 0x55, 0x66)

    untrusting = await instance_with(spawn, redis_server, "c", "--link", certificate.endpoint())
    plain = await instance_with(spawn, redis_server, "d")
    for newcomer, home, why in ((untrusting, b, "certificate verify failed"), (a, plain, "over TLS only")):
        call_id = uuid.uuid4()
        await leg_on(home, "resident", call_id, on_hangup="close")
        await wait_listed(newcomer, {(str(call_id), "resident"): home.name})
        leg = await leg_on(newcomer, "visitor", call_id, on_hangup="close")
        await settle(leg.closed, f"{newcomer.name}'s visitor to be hung up")
        assert leg.ended_with_single_hangup()
        hung_up, log = f"{call_id} visitor hangup sent (cause link)", newcomer.child
        await until(lambda: hung_up in log.log, 5, "the cause")  # noqa: B023 (awaited within the iteration)
        [failed] = [line for line in log.log.splitlines() if f"{call_id} visitor link from" in line]
        assert why in failed, failed


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


# What the home plays to a remote leg: paced there, heard by its recorder and streams, forwarded by the newcomer.


@pytest_twisted.async_yield_fixture
async def app() -> Any:
    made = App()
    yield await made.listen()
    await made.close()


async def missed_slots(at: Instance) -> int:
    """The 20 ms slots the instance's pacer missed (their audio dropped, not played late): a loaded machine's."""
    return int(metric_sum(await request_text(f"{at.url}/metrics"), "audiohangup_pacer_missed_slots_total"))


def played_in_order(heard: list[bytes], played: list[bytes], missed: int) -> None:
    """What a leg heard is what was played, byte for byte, in order; only a missed slot's frame may lack."""
    rest = iter(played)
    assert all(frame in rest for frame in heard), heard
    assert len(heard) >= len(played) - missed, (len(heard), len(played), missed)


@pytest_twisted.ensureDeferred
async def test_a_media_stream_of_the_remote_leg(spawn: Spawn, redis_server: RedisServer, app: App) -> None:
    """
    Both instances stream their visitors (converse, the project's own
    protocol): the visitor on A is streamed once, from B, its session's
    home; the app hears it byte-exact, and what the app says is paced on B
    and heard, byte-exact, by the visitor on A.
    """
    streaming = ("--stream-url", app.url("/s/{call_id}/{role}"), "--stream-roles", "visitor",
                 "--stream-protocol", "audiohangup")
    a = await instance_with(spawn, redis_server, "a", *streaming)
    b = await instance_with(spawn, redis_server, "b", *streaming)
    call_id, visitor, _ = await split_call(a, b, on_hangup="close")
    await until(lambda: app.connections and app.connections[0].events("start"), 10, "the stream's start")
    [stream] = app.connections
    assert stream.path == f"/s/{call_id}/visitor"
    spoken = frames_of(0x55)
    for frame in spoken:
        visitor.send(frame)
        await deferLater(reactor, 0.02)
    await until(lambda: len(stream.media()) >= FRAMES, 5, "the visitor's audio at the app")
    assert [message.payload for message in stream.media()] == [frame[3:] for frame in spoken]

    missed = await missed_slots(b)
    said = frames_of(0x66)
    stream.send_binary(b"".join(frame[3:] for frame in said))  # half a second at once: B paces it
    await until(lambda: heard(visitor)[-1:] == said[-1:], 5, "the app's audio on A's visitor")
    played_in_order(heard(visitor), said, await missed_slots(b) - missed)
    status, body, _ = await request("GET", f"{b.url}/calls/{call_id}")
    assert status == 200, body
    [remote] = [leg for leg in body["legs"] if leg["role"] == "visitor"]
    assert [s["state"] for s in remote["streams"]] == ["streaming"], remote
    assert len(app.connections) == 1  # not A's too

    # A stream opened through A, which holds the visitor's connection: B opens it.
    status, body, response = await request(
        "POST", f"{a.url}/calls/{call_id}/streams",
        json={"url": app.url("/listen"), "role": "visitor", "mode": "listen", "protocol": "audiohangup"},
    )
    assert status == 201, body
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"]
    await until(lambda: len(app.connections) == 2 and app.connections[1].events("start"), 10, "the second stream")
    assert app.connections[1].path == "/listen"


@pytest_twisted.ensureDeferred
async def test_play_on_the_remote_leg(spawn: Spawn, redis_server: RedisServer, tmp_path: Path) -> None:
    """
    /play of the visitor sent to A, which holds its connection: A passes it
    on to B, the session's home, which paces it (queued_ms) and records it
    (--recordings-mix heard: one WAV, both channels; A, though it records
    every call too, none); the visitor on A hears every frame, byte-exact,
    then the hangup after the playout sent to A.
    """
    record, elsewhere = tmp_path / "recordings", tmp_path / "a-recordings"
    recording = ("--record-every-call", "--recordings-mix", "heard", "--recordings-dir")
    a = await instance_with(spawn, redis_server, "a", *recording, str(elsewhere))
    b = await instance_with(spawn, redis_server, "b", *recording, str(record))
    call_id, visitor, resident = await split_call(a, b, on_hangup="close")
    status, body, response = await request("POST", f"{a.url}/calls/{call_id}/recording")
    assert status == 409, body  # B records the call already, its visitor on A too
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"]
    for _ in range(5):
        visitor.send(encode_frame(Kind.SLIN, numbered(1111)))  # the resident hears it: the right channel
        await deferLater(reactor, 0.02)
    prompt = [numbered(3000 + n) for n in range(50)]  # a second: what a leg's queue holds
    missed = await missed_slots(b)
    status, body, response = await request(
        "POST", f"{a.url}/calls/{call_id}/play?role=visitor", data=b"".join(prompt),
        headers={"Content-Type": "audio/L16;rate=8000"},
    )
    assert status == 200, body
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"]
    [played] = body["legs"]
    assert (played["role"], played["dropped_frames"]) == ("visitor", 0) and 0 < played["queued_ms"] <= 1000, body
    # Sent to A too: what the visitor is to hear is queued on B, which hangs it up once that is played.
    status, body, response = await request(
        "POST", f"{a.url}/calls/{call_id}/hangup?role=visitor&after_playout=true&wait=true"
    )
    assert status == 200, body
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["b"]
    await settle(visitor.closed, "the visitor on A to close")
    await settle(resident.closed, "the resident on B to close")
    frames = [encode_frame(Kind.SLIN, audio) for audio in prompt]
    missed = await missed_slots(b) - missed
    played_in_order(heard(visitor), frames, missed)
    assert heard(visitor)[-1] == frames[-1]  # played out before the hangup
    assert visitor.ended_with_single_hangup()

    done = re.compile(rf"{call_id} recording \S+ done")
    await until(lambda: done.search(b.child.log), 5, "the recording's end")  # its last tick written
    [path] = list(record.glob("*/*.wav"))
    _, left, right = read_wav(path)
    recorded = [tick for tick in ticks(left) if tick >= 3000]
    # Every frame the visitor heard, in order; the file's last tick may lack (the writer keeps a tick's lead).
    assert recorded == [3000 + prompt.index(frame[3:]) for frame in heard(visitor)][: len(recorded)]
    assert len(recorded) >= len(heard(visitor)) - 1, recorded
    assert 1111 in ticks(right) and not [tick for tick in ticks(right) if tick >= 3000], ticks(right)
    assert not list(elsewhere.glob("*/*.wav"))  # A records nothing of a call whose session is B's
