"""
One leg's state machine, driven deterministically: C{Clock} for the timers,
C{StringTransport} for the wire, and C{connectionLost} called by hand with the
failure Twisted would deliver (a fake transport never calls it itself).
"""

from __future__ import annotations

import errno
import socket
import uuid
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, ISystemHandle
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from audiohangup.audio import LegSettings
from audiohangup.http.api import leg_view
from audiohangup.pacer import Pacer
from audiohangup.protocol import DTMF_LOG_PER_SECOND, AudioSocketProtocol
from audiohangup.reasons import CloseReason, HangupCause, LegState, Loss, Role, classify, loss_of
from audiohangup.registry import PendingConnections, Registry
from audiohangup.sources import source_of
from audiohangup.wire import HANGUP_FRAME, Kind, encode_frame, encode_uuid

CALL = uuid.UUID("6f5c1279-b34f-4bdf-ba44-24b178d09a80")
AUDIO = encode_frame(Kind.SLIN, b"\x01\x02" * 160)


class LegTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.registry = Registry()
        self.settings = LegSettings(close_timeout=2.0, uuid_timeout=5.0)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(self, role: Role = Role.VISITOR) -> tuple[AudioSocketProtocol, StringTransport]:
        leg = AudioSocketProtocol(role, self.registry, self.settings, self.clock, self.pacer)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        leg.makeConnection(transport)
        return leg, transport

    def live(self, role: Role = Role.VISITOR) -> tuple[AudioSocketProtocol, StringTransport]:
        leg, transport = self.connect(role)
        leg.dataReceived(encode_uuid(CALL))
        self.assertIs(leg.state, LegState.LIVE)
        return leg, transport

    def ended(self) -> list[dict]:
        return [e for e in self.events if "leg ended" in e.get("log_format", "")]


class CloseTimeoutTests(LegTestCase):
    def test_hangupWritesOnceAndWaitsForThePeer(self) -> None:
        """
        A hangup writes C{00 00 00} and nothing else, and neither closes nor
        aborts: the peer is the one to close.
        """
        leg, transport = self.live()
        leg.hangup(HangupCause.API)
        self.assertEqual(transport.value(), HANGUP_FRAME)
        self.assertFalse(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.assertIs(leg.state, LegState.CLOSING)

    def test_abortsWhenThePeerDoesNotCloseInTime(self) -> None:
        """
        The close timeout aborts a leg whose peer keeps the socket open after
        our hangup, and the leg then ends as C{hangup_timeout}.
        """
        leg, transport = self.live()
        gone = leg.hangup(HangupCause.API)
        self.clock.advance(1.999)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.001)
        self.assertTrue(transport.disconnected)
        self.assertNoResult(gone)
        leg.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(self.successResultOf(gone), CloseReason.HANGUP_TIMEOUT)
        self.assertEqual(len(self.registry), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timelyCloseCancelsTheTimer(self) -> None:
        """A peer that closes in time ends the leg as C{hangup_clean}, no timer left."""
        leg, transport = self.live()
        gone = leg.hangup(HangupCause.API)
        self.clock.advance(1.0)
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(gone), CloseReason.HANGUP_CLEAN)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertFalse(transport.disconnected)

    def test_resetAfterHangupIsNormal(self) -> None:
        """A reset after our hangup is C{hangup_reset}, logged at info and called normal."""
        leg, _ = self.live()
        gone = leg.hangup(HangupCause.API)
        leg.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.successResultOf(gone), CloseReason.HANGUP_RESET)
        [event] = self.ended()
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["reason"], CloseReason.HANGUP_RESET)
        self.assertEqual(event["cause"], HangupCause.API)
        self.assertEqual(event["call_id"], str(CALL))
        self.assertIn("normal", event["explanation"])

    def test_hangupIsIdempotent(self) -> None:
        """A second hangup writes nothing and waits for the same end."""
        leg, transport = self.live()
        first = leg.hangup(HangupCause.API)
        second = leg.hangup(HangupCause.SHUTDOWN)
        self.assertEqual(transport.value(), HANGUP_FRAME)
        self.assertEqual(leg.hangup_cause, HangupCause.API)
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(first), CloseReason.HANGUP_CLEAN)
        self.assertEqual(self.successResultOf(second), CloseReason.HANGUP_CLEAN)
        self.assertEqual(self.successResultOf(leg.hangup(HangupCause.API)), CloseReason.HANGUP_CLEAN)

    def test_nothingIsWrittenAfterHangup(self) -> None:
        """After C{00 00 00}, C{send} refuses and inbound frames are discarded."""
        leg, transport = self.live()
        leg.hangup(HangupCause.API)
        self.assertFalse(leg.send(AUDIO))
        leg.dataReceived(AUDIO * 5 + encode_frame(Kind.ERROR, b"\x01") + b"\x10\x01")
        self.assertEqual(transport.value(), HANGUP_FRAME)
        self.assertIsNone(leg._decided)
        self.assertEqual(leg.frames_out, 1)


class UuidTimeoutTests(LegTestCase):
    def test_noUuidInTime(self) -> None:
        """A connection silent for the UUID timeout is closed, with nothing sent."""
        leg, transport = self.connect()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(leg.close_reason, CloseReason.UUID_TIMEOUT)
        [event] = self.ended()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_uuidCancelsTheTimer(self) -> None:
        """The UUID timer is gone once the UUID arrives."""
        leg, transport = self.live()
        self.clock.advance(self.settings.uuid_timeout)
        self.assertTrue(leg.live)
        self.assertFalse(transport.disconnecting)

    def test_closeAfterDecisionIsBounded(self) -> None:
        """
        After closing our side for a peer's fault, a peer that never lets go is
        aborted at the close timeout and the reason stays the peer's fault.
        """
        leg, transport = self.connect()
        self.clock.advance(5)
        self.clock.advance(2)
        self.assertTrue(transport.disconnected)
        leg.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(leg.close_reason, CloseReason.UUID_TIMEOUT)


class FrameTests(LegTestCase):
    def assertProtocolError(self, data: bytes, detail: str, live: bool = True) -> None:
        leg, transport = self.live() if live else self.connect()
        sent = transport.value()
        leg.dataReceived(data)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), sent, "nothing is sent after a protocol error")
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(leg.close_reason, CloseReason.PROTOCOL_ERROR)
        self.assertIn(detail, self.ended()[-1]["detail"])
        self.assertEqual(len(self.registry), 0)

    def test_audioBeforeUuid(self) -> None:
        self.assertProtocolError(AUDIO, "not a UUID", live=False)

    def test_shortUuid(self) -> None:
        self.assertProtocolError(encode_frame(Kind.UUID, b"\x01" * 15), "15 bytes", live=False)

    def test_secondUuid(self) -> None:
        self.assertProtocolError(encode_uuid(CALL), "second UUID")

    def test_longDtmf(self) -> None:
        self.assertProtocolError(encode_frame(Kind.DTMF, b"12"), "DTMF payload of 2 bytes")

    def test_emptyAudio(self) -> None:
        self.assertProtocolError(encode_frame(Kind.SLIN16, b""), "length 0")

    def test_framesAfterAnErrorAreIgnored(self) -> None:
        """Frames in the same chunk after a protocol error change nothing."""
        leg, _ = self.live()
        leg.dataReceived(encode_frame(Kind.SLIN, b"") + encode_frame(Kind.HANGUP) + AUDIO)
        self.assertEqual(leg._decided, CloseReason.PROTOCOL_ERROR)
        self.assertEqual(leg.frames_in, 2)

    def test_peerHangup(self) -> None:
        """A 0x00 frame from the peer closes our side with C{peer_hangup}, at info."""
        leg, transport = self.live()
        leg.dataReceived(AUDIO + HANGUP_FRAME)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        leg.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(leg.close_reason, CloseReason.PEER_HANGUP)
        self.assertEqual(self.ended()[-1]["log_level"], LogLevel.info)

    def test_peerError(self) -> None:
        """A 0xff frame ends the leg as C{peer_error}, at warn, with its code decoded."""
        leg, _transport = self.live()
        leg.dataReceived(encode_frame(Kind.ERROR, b"\x01"))
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(leg.close_reason, CloseReason.PEER_ERROR)
        [event] = self.ended()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("caller_hangup", event["detail"])

    def test_uuidSplitAnywhere(self) -> None:
        """The UUID registers the leg whatever the split, one byte at a time included."""
        frame = encode_uuid(CALL)
        for offset in range(1, len(frame)):
            registry = self.registry = Registry()
            leg, _ = self.connect()
            leg.dataReceived(frame[:offset])
            self.assertIsNone(registry.get(str(CALL), Role.VISITOR))
            leg.dataReceived(frame[offset:])
            self.assertIs(registry.get(str(CALL), Role.VISITOR), leg)
        self.registry = Registry()
        leg, _ = self.connect()
        for byte in frame:
            leg.dataReceived(bytes([byte]))
        self.assertIs(self.registry.get(str(CALL), Role.VISITOR), leg)

    def test_dtmfAndUnknownKinds(self) -> None:
        """DTMF digits are kept on the leg; unknown kinds are skipped in sync."""
        leg, _ = self.live()
        leg.dataReceived(
            encode_frame(Kind.DTMF, b"1") + encode_frame(0x02, b"xyz") + AUDIO
            + encode_frame(0x7F, b"") + encode_frame(Kind.DTMF, b"#")
        )
        self.assertEqual(leg.dtmf, "1#")
        self.assertIs(leg.state, LegState.LIVE)
        self.assertEqual(leg.frames_in, 6)

    def test_dtmfFloodIsCountedNotLogged(self) -> None:
        """
        Each digit is logged at info up to DTMF_LOG_PER_SECOND a second per
        leg, then one warning; the rest of that second is only counted.
        """
        leg, _ = self.live()
        digits = [e for e in self.events if "DTMF" in e.get("log_format", "")]
        leg.dataReceived(encode_frame(Kind.DTMF, b"5") * 1000)
        logged = [e for e in self.events if "DTMF" in e.get("log_format", "")][len(digits):]
        self.assertEqual(
            [e["log_level"] for e in logged], [LogLevel.info] * DTMF_LOG_PER_SECOND + [LogLevel.warn]
        )
        self.clock.advance(1.0)
        leg.dataReceived(encode_frame(Kind.DTMF, b"#"))
        last = [e for e in self.events if "DTMF" in e.get("log_format", "")][-1]
        self.assertEqual((last["log_level"], last["digit"]), (LogLevel.info, "#"))
        self.assertEqual(leg.dtmf_count, 1001)
        self.assertEqual(len(leg.dtmf), 64)

    def test_countsBothWays(self) -> None:
        leg, _transport = self.live()
        leg.dataReceived(AUDIO * 3)
        self.assertTrue(leg.send(AUDIO))
        snapshot = leg_view(leg)
        self.assertEqual(
            (snapshot["frames_in"], snapshot["bytes_in"], snapshot["frames_out"], snapshot["bytes_out"]),
            (4, 19 + 3 * len(AUDIO), 1, len(AUDIO)),
        )
        self.assertEqual(snapshot["peer"], "127.0.0.1:40000")
        self.assertEqual(snapshot["state"], "live")


class RegistryLifecycleTests(LegTestCase):
    def test_closeBeforeUuidLeavesNothing(self) -> None:
        """A connection that ends before or inside its UUID leaves no trace."""
        for data in (b"", encode_uuid(CALL)[:7]):
            leg, _ = self.connect()
            leg.dataReceived(data)
            leg.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(len(self.registry), 0)
            self.assertEqual(self.registry.connections(), [])
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_duplicateIsRefused(self) -> None:
        """
        By default a second connection for a live (call id, role) gets
        C{00 00 00} and nothing else, never joins the session, and ends as
        C{duplicate} at warn; the live legs are untouched.
        """
        visitor, visitor_transport = self.live()
        resident, resident_transport = self.live(Role.RESIDENT)
        newcomer, newcomer_transport = self.connect()
        newcomer.dataReceived(encode_uuid(CALL) + AUDIO * 3)
        self.assertEqual(newcomer_transport.value(), HANGUP_FRAME)
        self.assertIs(newcomer.state, LegState.CLOSING)
        self.assertEqual(self.registry.call(str(CALL)), [visitor, resident])
        self.assertEqual(len(self.pacer), 2)
        self.assertEqual((visitor_transport.value(), resident_transport.value()), (b"", b""))
        resident.dataReceived(AUDIO)  # the bridge: to the visitor only
        self.assertEqual(visitor_transport.value(), AUDIO)
        self.assertEqual(newcomer_transport.value(), HANGUP_FRAME)
        self.clock.advance(0.5)  # the pacer writes nothing to it either
        self.assertEqual(newcomer_transport.value(), HANGUP_FRAME)
        newcomer.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(newcomer.close_reason, CloseReason.DUPLICATE)
        self.assertEqual(newcomer.hangup_cause, HangupCause.DUPLICATE)
        self.assertEqual(self.registry.call(str(CALL)), [visitor, resident])
        self.assertTrue(visitor.live and resident.live)
        [ended] = self.ended()
        self.assertIs(ended["log_level"], LogLevel.warn)
        self.assertEqual((ended["call_id"], ended["reason"]), (str(CALL), CloseReason.DUPLICATE))

    def test_duplicateOfAClosingLegIsTaken(self) -> None:
        """A leg already hung up holds nothing: a new connection takes its place."""
        old, _ = self.live()
        old.hangup(HangupCause.API)
        new, new_transport = self.live()
        self.assertIs(self.registry.get(str(CALL), Role.VISITOR), new)
        self.assertEqual(new_transport.value(), b"")

    def test_replacedLeg(self) -> None:
        """
        With --on-duplicate replace, a second connection for a live (call id,
        role) replaces the first, which is hung up with cause C{replaced};
        the other role is untouched.
        """
        self.registry.on_duplicate = "replace"
        old, old_transport = self.live()
        resident, resident_transport = self.live(Role.RESIDENT)
        new, _ = self.live()
        self.assertEqual(old_transport.value(), HANGUP_FRAME)
        self.assertEqual(old.hangup_cause, HangupCause.REPLACED)
        self.assertIs(self.registry.get(str(CALL), Role.VISITOR), new)
        old.connectionLost(Failure(ConnectionLost()))
        self.assertIs(self.registry.get(str(CALL), Role.VISITOR), new)
        self.assertEqual(self.registry.call(str(CALL)), [new, resident])
        self.assertEqual(resident_transport.value(), b"")

    def test_unexpectedFailureIsABug(self) -> None:
        """A failure other than done, lost or aborted is logged as a failure."""
        leg, _ = self.live()
        leg.connectionLost(Failure(ValueError("boom")))
        self.assertEqual(leg.close_reason, CloseReason.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.registry), 0)


class PendingErrorSocket:
    """What C{getHandle()} returns: a socket whose pending error is C{error}."""

    def __init__(self, error: int) -> None:
        self.error = error

    def getsockopt(self, level: int, option: int) -> int:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR)
        error, self.error = self.error, 0  # reading it clears it, as the kernel does
        return error

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_SNDBUF)


@implementer(ISystemHandle)
class SocketTransport(StringTransport):
    def __init__(self, handle: PendingErrorSocket) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.handle = handle

    def getHandle(self) -> PendingErrorSocket:
        return self.handle


class EndOfStreamTests(LegTestCase):
    """
    The leg is half-closeable only to see the peer's end of stream while the
    socket is open: Twisted's poll reactors report a reset as a clean end when
    epoll says HUP|ERR without IN (twisted#4604), and the socket knows better.
    """

    def endOfStream(self, error: int, hang_up: bool = False) -> tuple[AudioSocketProtocol, SocketTransport]:
        leg = AudioSocketProtocol(Role.VISITOR, self.registry, self.settings, self.clock, self.pacer)
        transport = SocketTransport(PendingErrorSocket(error))
        leg.makeConnection(transport)
        leg.dataReceived(encode_uuid(CALL))
        if hang_up:
            leg.hangup(HangupCause.API)
        leg.readConnectionLost()
        return leg, transport

    def test_pendingResetIsAReset(self) -> None:
        leg, transport = self.endOfStream(errno.ECONNRESET)
        self.assertTrue(transport.disconnecting)  # our side closes
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertIs(leg.close_reason, CloseReason.PEER_RESET)

    def test_pendingResetAfterOurHangup(self) -> None:
        leg, _ = self.endOfStream(errno.ECONNRESET, hang_up=True)
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertIs(leg.close_reason, CloseReason.HANGUP_RESET)

    def test_noPendingErrorIsAClose(self) -> None:
        leg, _ = self.endOfStream(0)
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertIs(leg.close_reason, CloseReason.PEER_CLOSED)

    def test_whatOurCloseMeetsAfterACleanEndDoesNotCount(self) -> None:
        """
        The peer closed cleanly; our flush then meeting its RST, or the close
        timer aborting, does not turn its close into a reset.
        """
        leg, _ = self.endOfStream(0)
        self.assertIs(leg.state, LegState.CLOSING)
        self.clock.advance(self.settings.close_timeout)  # bounded like every close
        leg.connectionLost(Failure(ConnectionAborted()))
        self.assertIs(leg.close_reason, CloseReason.PEER_CLOSED)
        leg, _ = self.endOfStream(0, hang_up=True)
        leg.connectionLost(Failure(ConnectionLost()))
        self.assertIs(leg.close_reason, CloseReason.HANGUP_CLEAN)


class ClassifyTests(SynchronousTestCase):
    def test_lossOfOrderMatters(self) -> None:
        """An abort is not taken for a reset although it subclasses C{ConnectionLost}."""
        self.assertIs(loss_of(Failure(ConnectionAborted())), Loss.ABORTED)
        self.assertIs(loss_of(Failure(ConnectionDone())), Loss.CLEAN)
        self.assertIs(loss_of(Failure(ConnectionLost())), Loss.RESET)
        self.assertIs(loss_of(Failure(RuntimeError())), Loss.OTHER)

    def test_table(self) -> None:
        cases = [
            (True, None, Loss.CLEAN, CloseReason.HANGUP_CLEAN),
            (True, None, Loss.RESET, CloseReason.HANGUP_RESET),
            (True, None, Loss.ABORTED, CloseReason.HANGUP_TIMEOUT),
            (False, None, Loss.CLEAN, CloseReason.PEER_CLOSED),
            (False, None, Loss.RESET, CloseReason.PEER_RESET),
            (False, CloseReason.PEER_HANGUP, Loss.RESET, CloseReason.PEER_HANGUP),
            (False, CloseReason.PROTOCOL_ERROR, Loss.ABORTED, CloseReason.PROTOCOL_ERROR),
            (True, None, Loss.OTHER, CloseReason.INTERNAL_ERROR),
        ]
        for sent, decided, loss, expected in cases:
            self.assertIs(classify(hangup_sent=sent, decided=decided, loss=loss), expected)

    def test_levels(self) -> None:
        """The levels the product promises."""
        warn = {r for r in CloseReason if r.level is LogLevel.warn}
        self.assertEqual(
            {r.value for r in warn},
            {
                "peer_reset", "peer_error", "protocol_error", "uuid_timeout", "over_capacity", "slow_consumer",
                "duplicate", "link_lost", "draining",
            },
        )
        for name in ("hangup_clean", "hangup_reset", "hangup_timeout", "peer_closed", "peer_hangup"):
            self.assertIs(CloseReason(name).level, LogLevel.info)


class PendingTests(LegTestCase):
    """Connections without a UUID: capped per source, and making way at --max-legs."""

    def connectFrom(self, address: IAddress) -> tuple[AudioSocketProtocol, StringTransport]:
        leg = AudioSocketProtocol(Role.VISITOR, self.registry, self.settings, self.clock, self.pacer)
        transport = StringTransport(peerAddress=address)
        leg.makeConnection(transport)
        self.clock.advance(0.01)
        return leg, transport

    def test_sources(self) -> None:
        """An IPv4 address, an IPv6 /64 (a mapped IPv4 client as IPv4), no source for a UNIX socket."""
        self.assertEqual(source_of(IPv4Address("TCP", "10.0.0.5", 1)), "10.0.0.5")
        self.assertEqual(source_of(IPv6Address("TCP", "2001:db8:1:2:3::9", 1)), "2001:db8:1:2::/64")
        self.assertEqual(source_of(IPv6Address("TCP", "fe80::1%eth0", 1)), "fe80::/64")
        self.assertEqual(source_of(IPv6Address("TCP", "::ffff:10.0.0.5", 1)), "10.0.0.5")
        self.assertIsNone(source_of(UNIXAddress(b"/run/a.sock")))

    def test_oldestOfASourceMakesWay(self) -> None:
        """
        Past the cap, the source's oldest pending connection is closed as
        too_many_pending (at debug, the crowding at warn once a minute);
        other sources and connections that sent their UUID are untouched.
        """
        self.settings = LegSettings(max_pending_per_source=3)
        other, _ = self.connectFrom(IPv6Address("TCP", "2001:db8:0:1::1", 1))  # another /64
        live, _ = self.connectFrom(IPv4Address("TCP", "10.0.0.9", 1))
        live.dataReceived(encode_uuid(CALL))
        flood = [self.connectFrom(IPv6Address("TCP", f"2001:db8:0:0:{n}::1", 2)) for n in range(6)]
        closed = [leg for leg, transport in flood if transport.disconnecting]
        self.assertEqual(closed, [leg for leg, _ in flood[:3]])
        self.assertFalse(other.transport.disconnecting)
        self.assertIs(live.state, LegState.LIVE)
        for leg in closed:
            leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([e["log_level"] for e in self.ended()], [LogLevel.debug] * 3)
        self.assertEqual({e["reason"] for e in self.ended()}, {CloseReason.TOO_MANY_PENDING})
        self.assertIn("--max-pending-per-source 3", self.ended()[0]["detail"])
        warned = [e for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warned), 1)
        self.assertEqual(warned[0]["detail"], "over --max-pending-per-source 3 connections without a UUID from 2001:db8::/64")
        self.assertEqual(self.registry.pending.count("2001:db8::/64"), 3)

    def test_unixSourcesAreNotCapped(self) -> None:
        self.settings = LegSettings(max_pending_per_source=1)
        legs = [self.connectFrom(UNIXAddress(None)) for _ in range(3)]
        self.assertFalse(any(transport.disconnecting for _, transport in legs))

    def test_atMaxLegsTheSourceWithTheMostMakesWay(self) -> None:
        """At --max-legs a newcomer takes the place of the oldest pending connection of the busiest source."""
        self.settings = LegSettings(max_legs=4, max_pending_per_source=0)
        real, _ = self.connectFrom(IPv4Address("TCP", "10.0.0.9", 1))
        flood = [self.connectFrom(IPv4Address("TCP", "10.0.0.66", n)) for n in range(3)]
        _, transport = self.connectFrom(IPv4Address("TCP", "10.0.0.7", 1))
        self.assertFalse(transport.disconnecting)
        self.assertEqual([leg.transport.disconnecting for leg, _ in flood], [True, False, False])
        self.assertFalse(real.transport.disconnecting)
        self.assertIn("--max-legs 4 connections are open", flood[0][0]._detail)

    def test_overCapacityWithoutPending(self) -> None:
        """Only legs (and closing connections) refuse a newcomer."""
        self.settings = LegSettings(max_legs=2)
        for _ in range(2):
            leg, _ = self.connectFrom(IPv4Address("TCP", "10.0.0.9", 1))
            leg.dataReceived(encode_uuid(uuid.uuid4()))
        refused, transport = self.connectFrom(IPv4Address("TCP", "10.0.0.9", 1))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(refused._decided, CloseReason.OVER_CAPACITY)


class _Pending:
    """A connection without its UUID, as L{PendingConnections} sees one."""

    def __init__(self, waiting: bool = False) -> None:
        self.waiting = waiting

    def bytesWaiting(self) -> bool:
        return self.waiting


class PendingConnectionsTests(SynchronousTestCase):
    def test_bytesWaitingAreNotTheOldest(self) -> None:
        """
        A connection whose bytes (its UUID, after a stall) wait unread is
        passed over: it is about to be a leg. With every one of them so,
        there is none to close.
        """
        pending = PendingConnections()
        speaking, quiet = _Pending(waiting=True), _Pending()
        for connection in (speaking, quiet):
            pending.add(connection, "10.0.0.5")  # type: ignore[arg-type]
        self.assertIs(pending.oldest("10.0.0.5"), quiet)
        self.assertIs(pending.oldestOfMost(), quiet)
        quiet.waiting = True
        self.assertIsNone(pending.oldest("10.0.0.5"))
        self.assertIsNone(pending.oldestOfMost())

    @given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=60))
    def test_oldestOfMost(self, steps: list[tuple[bool, int]]) -> None:
        """The busiest source's oldest, in O(1), matches a count over every source."""
        pending = PendingConnections()
        held: list[tuple[_Pending, str | None]] = []
        for add, n in steps:
            source = None if n == 3 else f"s{n}"
            if add or not held:
                connection = _Pending()
                pending.add(connection, source)  # type: ignore[arg-type]
                held.append((connection, source))
            else:
                connection, _ = held.pop(n % len(held))
                pending.discard(connection)  # type: ignore[arg-type]
                pending.discard(connection)  # type: ignore[arg-type]
            counts = Counter(source for _, source in held)
            most = max(counts.values(), default=0)
            expected = [c for c, s in held if counts[s] == most]
            self.assertEqual(len(pending), len(held))
            found = pending.oldestOfMost()
            if most:
                source = pending._source[found]  # type: ignore[index]
                self.assertEqual(counts[source], most)
                self.assertIs(found, next(c for c, s in held if s == source))
                self.assertIn(found, expected)
            else:
                self.assertIsNone(found)
