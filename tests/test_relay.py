"""
The relay reads the legs' sockets in one pass per wakeup. Unit tests drive it
with real socket pairs, a memory reactor and recording transports; the
loopback tests check that a real server's bridged legs are read by it (and
not by the reactor), that nothing leaks, and that every way a leg ends still
reaches Twisted (the teardown tests all run through it too). The last ones
check the switch that turns the relay and the direct send off
(C{AUDIOHANGUP_FAST_PATHS=off}), with which CI runs the whole suite once.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from audiohangup import relay as relay_module
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.relay import Relay
from audiohangup.wire import Kind, encode_frame
from tests.conftest import LogCapture, Server, bridged, until

#: The tests of the relay at work: they need epoll and the fast paths on (not AUDIOHANGUP_FAST_PATHS=off).
needs_relay = pytest.mark.skipif(not relay_module.available(), reason="the relay needs epoll and the fast paths on")

FRAME = encode_frame(Kind.SLIN, bytes(320))


class Leg:
    """What the relay hands bytes to; may raise, or act on the relay, on a frame."""

    def __init__(self, on_data: Any = None) -> None:
        self.received: list[bytes] = []
        self.on_data = on_data

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.on_data is not None:
            self.on_data()


class Handle:
    """A socket whose recv meets what came after the poll: a reset, or an end of stream."""

    def __init__(self, sock: socket.socket, reset: bool = True) -> None:
        self.sock = sock
        self.reset = reset

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        if self.reset:
            raise ConnectionResetError(104, "Connection reset by peer")
        return b""


@implementer(IHalfCloseableDescriptor)
class Transport:
    """
    A leg's transport as the relay uses it: its socket, reading paused and
    resumed, its own read (as tcp.Connection.doRead answers) and its ends.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.reading = True
        self.reads: list[bytes] = []
        self.lost: list[Failure] = []
        self.read_lost: list[Failure] = []

    def doRead(self) -> object:
        try:
            data = self.handle.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return CONNECTION_LOST
        if not data:
            return CONNECTION_DONE
        self.reads.append(data)
        return None

    def readConnectionLost(self, reason: Failure) -> None:
        self.read_lost.append(reason)

    def getHandle(self) -> Any:
        return self.handle

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class RelayTests(SynchronousTestCase):
    # Skipped by trial before it runs anything: a SkipTest raised in setUp would leave trial's
    # log observer installed, and the next trial test would be blamed for errors logged meanwhile.
    skip = None if relay_module.available() else "the relay needs epoll and the fast paths on"

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.relay = Relay(self.reactor)
        self.relay.startService()
        self.addCleanup(lambda: self.relay.running and self.relay.stopService())

    def pair(self) -> tuple[socket.socket, socket.socket]:
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        return ours, peer

    def adopt(self, leg: Leg | None = None, handle: Any = None) -> tuple[Leg, Transport, socket.socket]:
        ours, peer = self.pair()
        leg = leg or Leg()
        transport = Transport(handle or ours)
        self.assertTrue(self.relay.adopt(leg, transport))
        return leg, transport, peer

    def test_oneReaderForEveryLeg(self) -> None:
        """The reactor reads one descriptor, the relay's; each adopted transport stops its own reading."""
        self.assertEqual(self.reactor.getReaders(), [self.relay])
        legs = [self.adopt() for _ in range(3)]
        self.assertEqual(len(self.relay), 3)
        self.assertFalse(any(transport.reading for _, transport, _ in legs))

    def test_onePassReadsEveryLegWithBytes(self) -> None:
        legs = [self.adopt() for _ in range(3)]
        for index, (_, _, peer) in enumerate(legs):
            if index != 1:
                peer.send(FRAME + bytes([index]))
        self.relay.doRead()
        self.assertEqual(legs[0][0].received, [FRAME + b"\x00"])
        self.assertEqual(legs[1][0].received, [])
        self.assertEqual(legs[2][0].received, [FRAME + b"\x02"])

    def test_endOfStreamGoesToTwistedAtOnce(self) -> None:
        """
        Bytes and an end of stream together: the transport reads again and
        its own read runs in the same pass (the next poll may be too late: a
        write to the closed peer would bring a RST).
        """
        leg, transport, peer = self.adopt()
        peer.send(FRAME)
        peer.shutdown(socket.SHUT_WR)
        self.relay.doRead()
        self.assertEqual((leg.received, transport.reads), ([], [FRAME]))
        self.assertTrue(transport.reading)
        self.assertEqual(len(self.relay), 0)
        self.assertEqual(self.reactor.getReaders(), [self.relay])  # a memory reactor: resumeProducing is ours

    def test_bareEndOfStreamIsAHalfClose(self) -> None:
        """An end of stream with nothing before it: readConnectionLost, as the reactor calls it."""
        leg, transport, peer = self.adopt()
        peer.shutdown(socket.SHUT_WR)
        self.relay.doRead()
        [reason] = transport.read_lost
        self.assertIsInstance(reason.value, ConnectionDone)
        self.assertEqual((leg.received, transport.lost, len(self.relay)), ([], [], 0))

    def test_endOfStreamAfterThePoll(self) -> None:
        ours, peer = self.pair()
        _, transport, _ = self.adopt(handle=Handle(ours, reset=False))
        peer.send(FRAME)
        self.relay.doRead()
        [reason] = transport.read_lost
        self.assertIsInstance(reason.value, ConnectionDone)

    def test_resetGoesToTwistedAtOnce(self) -> None:
        """A reset is read by the transport's own read: connectionLost(ConnectionLost), as Twisted ends it."""
        leg, transport, peer = self.adopt()
        transport.getHandle().send(FRAME)  # left unread: a socket closed over unread bytes resets
        peer.close()
        self.relay.doRead()
        [reason] = transport.lost
        self.assertIsInstance(reason.value, ConnectionLost)
        self.assertEqual((leg.received, transport.read_lost, len(self.relay)), ([], [], 0))

    def test_unwatchableDescriptorIsLeftToTwisted(self) -> None:
        """A descriptor epoll refuses (here a regular file) stays the reactor's: adopt says so."""
        with open(__file__, "rb") as file:
            transport = Transport(file)
            self.assertFalse(self.relay.adopt(Leg(), transport))
        self.assertTrue(transport.reading)
        self.assertEqual(len(self.relay), 0)

    def test_failedReadEndsTheConnectionAsTwistedWould(self) -> None:
        """A recv that fails after the poll: connectionLost(ConnectionLost), the other legs read on."""
        ours, peer = self.pair()
        broken_leg, broken, _ = self.adopt(handle=Handle(ours))
        peer.send(FRAME)
        other, _, other_peer = self.adopt()
        other_peer.send(FRAME)
        self.relay.doRead()
        [reason] = broken.lost
        self.assertIsInstance(reason.value, ConnectionLost)
        self.assertFalse(broken.reading)
        self.assertEqual(broken_leg.received, [])
        self.assertEqual(other.received, [FRAME])
        self.assertEqual(len(self.relay), 1)

    def test_legThatRaisesEndsAloneAndIsLogged(self) -> None:
        def fail() -> None:
            raise ValueError("a bug")

        _, transport, peer = self.adopt(Leg(on_data=fail))
        other, _, other_peer = self.adopt()
        peer.send(FRAME)
        other_peer.send(FRAME)
        self.relay.doRead()
        [reason] = transport.lost
        self.assertIsInstance(reason.value, ValueError)
        self.assertEqual(other.received, [FRAME])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_legReleasedInThePassIsNotRead(self) -> None:
        """One leg's bytes may end another (a hangup, a close): the relay reads that one no more."""
        first, second = Leg(), Leg()
        first.on_data = lambda: self.relay.release(second, resume=False)
        second.on_data = lambda: self.relay.release(first, resume=False)
        _, _, peer_one = self.adopt(first)
        _, _, peer_two = self.adopt(second)
        peer_one.send(FRAME)
        peer_two.send(FRAME)
        self.relay.doRead()
        self.assertEqual(len(first.received) + len(second.received), 1)

    def test_releaseResumesOrNot(self) -> None:
        leg, transport, _ = self.adopt()
        self.relay.release(leg, resume=False)
        self.assertFalse(transport.reading)
        self.relay.release(leg)  # no longer adopted: nothing
        self.assertFalse(transport.reading)
        leg, transport, _ = self.adopt()
        self.relay.release(leg)
        self.assertTrue(transport.reading)
        self.assertEqual(len(self.relay), 0)

    def test_descriptorReusedByAnotherLeg(self) -> None:
        """A leg released after its descriptor went to a new leg: the new leg stays adopted."""
        ours, peer = socket.socketpair()
        old = Leg()
        self.assertTrue(self.relay.adopt(old, Transport(ours)))
        number = ours.fileno()
        ours.close()
        peer.close()
        new, transport, new_peer = self.adopt()
        if transport.getHandle().fileno() != number:
            self.skipTest("the kernel gave the new socket another descriptor")
        self.relay.release(old)
        self.assertEqual(len(self.relay), 1)
        new_peer.send(FRAME)
        self.relay.doRead()
        self.assertEqual(new.received, [FRAME])

    def test_stopGivesTheLegsBackToTwisted(self) -> None:
        legs = [self.adopt() for _ in range(2)]
        self.relay.stopService()
        self.assertTrue(all(transport.reading for _, transport, _ in legs))
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(self.relay.fileno(), -1)
        self.assertFalse(self.relay.adopt(Leg(), Transport(self.pair()[0])))

    def test_reactorShutdownEndsThePausedTransports(self) -> None:
        """
        The reactor's disconnectAll only knows what it reads or writes: the
        relay ends its own, every one even if one of them raises.
        """
        legs = [self.adopt() for _ in range(3)]

        def fail(reason: Failure) -> None:
            raise ValueError("a bug")

        legs[0][1].connectionLost = fail  # type: ignore[method-assign]
        reason = Failure(ConnectionLost())
        self.relay.connectionLost(reason)
        self.assertEqual([transport.lost for _, transport, _ in legs[1:]], [[reason], [reason]])
        self.assertEqual((len(self.relay), self.relay.fileno()), (0, -1))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


# Over loopback, with the real server


@needs_relay
@pytest_twisted.ensureDeferred
async def test_bridged_legs_are_read_by_the_relay(server: Server, logs: LogCapture) -> None:
    """
    Both legs of a bridged call are the relay's, not the reactor's; audio
    crosses both ways; a hangup and the peers' close leave nothing adopted.
    """
    from twisted.internet import reactor

    relay = server.service.relay
    call_id, visitor, resident = await bridged(server)
    legs = [server.registry.get(str(call_id), role) for role in Role]
    assert len(relay) == 2
    readers = reactor.getReaders()
    assert relay in readers and not any(leg.transport in readers for leg in legs)
    marks = [encode_frame(Kind.SLIN, bytes([n]) * 320) for n in (1, 2)]
    visitor.send(marks[0])
    resident.send(marks[1])
    await until(lambda: marks[0] in [f.encode() for f in resident.frames], what="the visitor's frame")
    await until(lambda: marks[1] in [f.encode() for f in visitor.frames], what="the resident's frame")
    reasons = [await leg.hangup(HangupCause.API) for leg in legs]
    assert set(reasons) <= {CloseReason.HANGUP_CLEAN, CloseReason.HANGUP_RESET}
    assert len(relay) == 0 and len(server.registry) == 0


@needs_relay
@pytest_twisted.ensureDeferred
async def test_a_live_leg_keeps_its_state_in_slots(server: Server, logs: LogCapture) -> None:
    """
    What the relay and the pacer read of a leg, every frame and every tick,
    is in the protocol's slots: a live, bridged leg's instance dict holds
    only what Twisted sets on every protocol. An attribute added without a
    slot lands in the dict, and fails here.
    """
    call_id, _, _ = await bridged(server)
    legs = [server.registry.get(str(call_id), role) for role in Role]
    for leg in legs:
        assert leg.route is not None
        assert set(vars(leg)) <= {"transport", "factory", "connected"}, sorted(vars(leg))
    reasons = [await leg.hangup(HangupCause.API) for leg in legs]
    assert set(reasons) <= {CloseReason.HANGUP_CLEAN, CloseReason.HANGUP_RESET}


@needs_relay
@pytest_twisted.ensureDeferred
async def test_a_closing_leg_keeps_being_read_until_the_peer_closes(server: Server, logs: LogCapture) -> None:
    """After 00 00 00 the leg reads on (and discards) through the relay, then the peer's close ends it."""
    from tests.fake_asterisk import connect

    relay = server.service.relay
    client = await connect(server.port(Role.VISITOR), on_hangup="ignore")
    call_id = uuid.uuid4()
    client.send_uuid(call_id)
    await until(lambda: server.registry.get(str(call_id), Role.VISITOR), what="the leg")
    leg = server.registry.get(str(call_id), Role.VISITOR)
    gone = leg.hangup(HangupCause.API)
    await until(lambda: client.hangup_frames == 1, what="00 00 00")
    before = leg.bytes_in
    client.send(FRAME)
    await until(lambda: leg.bytes_in == before + len(FRAME), what="the frame sent after 00 00 00 to be read")
    assert len(relay) == 1
    client.close()
    assert await gone is CloseReason.HANGUP_CLEAN
    assert len(relay) == 0


# The switch: AUDIOHANGUP_FAST_PATHS=off


class FastPathsSwitchTests(SynchronousTestCase):
    def test_offTurnsThemOff(self) -> None:
        """C{off} (and C{0}, C{no}, C{false}, in any case) turns them off; anything else, or nothing, leaves them on."""
        for value in ("off", "OFF", " off\n", "0", "no", "false"):
            self.assertFalse(relay_module.fast_paths_in({"AUDIOHANGUP_FAST_PATHS": value}), value)
        for value in ("on", "1", "", "yes"):
            self.assertTrue(relay_module.fast_paths_in({"AUDIOHANGUP_FAST_PATHS": value}), value)
        self.assertTrue(relay_module.fast_paths_in({}))

    def test_readOnceAtStartUp(self) -> None:
        """A process started with C{AUDIOHANGUP_FAST_PATHS=off} has them off, and no relay to read with."""
        import os
        import subprocess
        import sys

        environment = {**os.environ, "AUDIOHANGUP_FAST_PATHS": "off"}
        answer = subprocess.run(
            [sys.executable, "-c", "from audiohangup import relay; print(relay.fast_paths(), relay.available())"],
            env=environment, capture_output=True, text=True, check=True,
        )
        self.assertEqual(answer.stdout.split(), ["False", "False"])

    def test_aRelayOffReadsNothing(self) -> None:
        """Started with the fast paths off, the relay is no reader of the reactor, adopts nothing, and says so once."""
        from twisted.logger import globalLogPublisher

        self.patch(relay_module, "FAST_PATHS", False)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = MemoryReactor()
        relay = Relay(reactor)
        relay.startService()
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        transport = Transport(ours)
        self.assertFalse(relay.adopt(Leg(), transport))
        self.assertTrue(transport.reading)
        self.assertEqual((reactor.getReaders(), len(relay), relay.fileno()), ([], 0, -1))
        said = [e.get("variable") for e in events if e.get("log_namespace") == "audiohangup.relay.Relay"]
        self.assertEqual(said, ["AUDIOHANGUP_FAST_PATHS"])
        relay.stopService()


@pytest_twisted.ensureDeferred
async def test_a_bridged_call_with_the_fast_paths_off(
    make_server: Any, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With C{AUDIOHANGUP_FAST_PATHS=off} the relay is not installed and a leg
    writes through its transport: the reactor reads both legs, every frame
    goes through Twisted's write, and a bridged call works as ever.
    """
    from twisted.internet import reactor

    monkeypatch.setattr(relay_module, "FAST_PATHS", False)
    server = await make_server()
    relay = server.service.relay
    call_id, visitor, resident = await bridged(server)
    legs = [server.registry.get(str(call_id), role) for role in Role]
    readers = reactor.getReaders()
    assert relay not in readers and len(relay) == 0
    assert all(leg.transport in readers for leg in legs)
    written: list[bytes] = []
    for leg in legs:
        original = leg.transport.write
        monkeypatch.setattr(leg.transport, "write", lambda data, original=original: (written.append(data), original(data)))
    marks = [encode_frame(Kind.SLIN, bytes([n]) * 320) for n in (1, 2)]
    visitor.send(marks[0])
    resident.send(marks[1])
    await until(lambda: marks[0] in [f.encode() for f in resident.frames], what="the visitor's frame")
    await until(lambda: marks[1] in [f.encode() for f in visitor.frames], what="the resident's frame")
    assert marks[0] in written and marks[1] in written  # Twisted wrote them: no direct send
    reasons = [await leg.hangup(HangupCause.API) for leg in legs]
    assert set(reasons) <= {CloseReason.HANGUP_CLEAN, CloseReason.HANGUP_RESET}
    assert len(server.registry) == 0
