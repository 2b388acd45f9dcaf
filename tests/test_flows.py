"""
Sessions, flows, pacing and time limits, driven deterministically: legs on
C{StringTransport}s, one C{Clock} for every timer and for the shared pacer.
"""

from __future__ import annotations

import uuid

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from audiohangup.audio import FORMATS, SLIN, FrameQueue, LegSettings
from audiohangup.flows import BUILTIN_FLOWS, EchoFlow, FlowLoadError, IFlow, SilenceFlow, load_flow
from audiohangup.http.api import leg_view
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.registry import Registry
from audiohangup.session import Session
from audiohangup.wire import HANGUP_FRAME, FrameDecoder, Kind, encode_frame, encode_uuid

CALL = uuid.UUID("1e3d5c7b-9a8f-4e6d-b5c4-a3b2c1d0e9f8")


def audio(seed: int, fmt=SLIN) -> bytes:
    """One encoded 20 ms frame of recognisable, non-silent audio."""
    return encode_frame(fmt.kind, bytes((seed + i) % 251 + 1 for i in range(fmt.frame_bytes)))


class Tap:
    def legAudio(self, frame: object) -> None:
        pass

    def legDtmf(self, digit: str) -> None:
        pass

    def legHeard(self, data: bytes) -> None:
        pass


class Wire(StringTransport):
    """A transport that decodes what the server wrote."""

    def frames(self) -> list[bytes]:
        return [frame.encode() for frame in FrameDecoder().feed(self.value())]


class SessionTestCase(SynchronousTestCase):
    flow = BUILTIN_FLOWS["bridge"]
    end_with_leg = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.registry = Registry(self.flow, end_with_leg=self.end_with_leg)
        self.settings = LegSettings()

    def leg(self, role: Role = Role.VISITOR, settings: LegSettings | None = None) -> tuple[AudioSocketProtocol, Wire]:
        leg = AudioSocketProtocol(role, self.registry, settings or self.settings, self.clock, self.pacer)
        wire = Wire(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        leg.makeConnection(wire)
        leg.dataReceived(encode_uuid(CALL))
        return leg, wire

    def tick(self, count: int = 1) -> None:
        # A hair past each 20 ms, so float sums never land just short of a deadline.
        for _ in range(count):
            self.clock.advance(0.020 + 1e-9)


class BridgeTests(SessionTestCase):
    def test_forwardedAtOnce(self) -> None:
        """
        A frame on one leg is on the other leg's wire before any time passes:
        the bridge waits for no tick.
        """
        visitor, visitor_wire = self.leg(Role.VISITOR)
        resident, resident_wire = self.leg(Role.RESIDENT)
        frames = [audio(n) for n in range(3)]
        visitor.dataReceived(b"".join(frames))
        self.assertEqual(resident_wire.frames(), frames)
        resident.dataReceived(frames[0])
        self.assertEqual(visitor_wire.frames(), frames[:1])

    def test_oneFrameAReadTakesTheRoute(self) -> None:
        """
        Two legs of one format route to each other: a read of one whole frame
        of the leg's audio goes out as the same bytes without a flow call; a
        prompt still has the floor; a lone leg, or a tap on the leg, goes back
        to the flow.
        """
        visitor, _visitor_wire = self.leg(Role.VISITOR)
        self.assertIsNone(visitor.route)
        resident, resident_wire = self.leg(Role.RESIDENT)
        self.assertIs(visitor.route, resident)
        self.assertIs(resident.route, visitor)
        session = self.registry.session(str(CALL))
        calls: list[bytes] = []
        original = session._audioHook
        session._audioHook = lambda s, leg, frame: (calls.append(frame.encode()), original(s, leg, frame))
        frame = audio(7)
        visitor.dataReceived(frame)
        self.assertEqual((resident_wire.value(), calls), (frame, []))  # the route: no flow call
        self.assertEqual((visitor.frames_in, resident.frames_out, resident.bytes_out), (2, 1, len(frame)))
        resident_wire.clear()
        resident.play(b"\x01\x00" * 160)
        visitor.dataReceived(audio(8))
        self.assertEqual(resident_wire.value(), b"")  # the prompt has the floor on the route too
        resident.queue.clear()
        visitor.addTap(Tap())
        visitor.dataReceived(audio(9))
        self.assertEqual((resident_wire.value(), calls), (audio(9), [audio(9)]))  # a tap: through the flow
        resident.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(visitor.route)

    def test_pacerFillsOnlyTheGaps(self) -> None:
        """
        A leg fed by the bridge gets no extra silence; once the bridge goes
        quiet, silence resumes at the next tick.
        """
        visitor, _ = self.leg(Role.VISITOR)
        _resident, resident_wire = self.leg(Role.RESIDENT)
        for n in range(10):
            visitor.dataReceived(audio(n))
            self.tick()
        self.assertEqual(resident_wire.frames(), [audio(n) for n in range(10)])
        self.tick(2)
        self.assertEqual(resident_wire.frames()[10:], [SLIN.silence_frame] * 2)

    def test_lateTickSlipsNoSilenceIntoTheBridge(self) -> None:
        """
        A tick the reactor runs late judges the bridge as of when the tick was
        due: the bridged frames are held up by the same delay, so no silence
        goes in between them (an overloaded server would only add work).
        """
        visitor, _ = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        self.clock.advance(0.035)  # the tick due at 20 ms sends silence
        visitor.dataReceived(audio(1))
        self.clock.advance(0.050)  # the ticks due at 40, 60 and 80 ms run once, at 85 ms
        self.assertEqual(self.pacer.late_ticks, 1)
        self.assertEqual(resident_wire.frames(), [SLIN.silence_frame, audio(1)])
        self.clock.advance(0.020)  # due at 100 ms and on time: the bridge is quiet, silence
        self.assertEqual(resident_wire.frames()[2:], [SLIN.silence_frame])

    def test_bridgeAfterThePacerRestarts(self) -> None:
        """
        The pacer stops with its last leg and starts again with the next: its
        first tick then is on time, and a bridged leg still gets no silence.
        """
        first, _ = self.leg(Role.VISITOR)
        self.tick()
        first.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.pacer), 0)
        self.clock.advance(60)
        visitor, _ = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        for n in range(5):
            visitor.dataReceived(audio(n))
            self.tick()
        self.assertEqual(resident_wire.frames(), [audio(n) for n in range(5)])
        self.assertEqual(self.pacer.late_ticks, 0)

    def test_idleLegIsHungUpWhileTheBridgeFeedsIt(self) -> None:
        """The pacer's shortcut for bridged legs still checks that their own peer talks."""
        settings = LegSettings(idle_timeout=0.5)
        visitor, visitor_wire = self.leg(Role.VISITOR, settings=settings)
        resident, _ = self.leg(Role.RESIDENT, settings=settings)
        for n in range(24):
            resident.dataReceived(audio(n))
            self.tick()
        self.assertTrue(visitor.live)
        self.assertNotIn(SLIN.silence_frame, visitor_wire.frames()[1:])
        resident.dataReceived(audio(24))
        self.tick()
        self.assertEqual(visitor.hangup_cause, HangupCause.IDLE_TIMEOUT)
        self.assertEqual(visitor_wire.frames()[-1], HANGUP_FRAME)
        self.assertTrue(resident.live)

    def test_loneLegHearsSilence(self) -> None:
        """From its UUID on, a lone leg gets one silence frame per tick."""
        _, wire = self.leg()
        self.assertEqual(wire.value(), b"")
        self.tick(50)
        self.assertEqual(wire.frames(), [SLIN.silence_frame] * 50)

    def test_audioOfAnotherKindIsConverted(self) -> None:
        """
        Audio of another kind than the leg declares is converted to the other
        leg's format (and logged once, by the leg), not played at the wrong speed.
        """
        visitor, _ = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        for _ in range(5):
            visitor.dataReceived(encode_frame(Kind.SLIN16, b"\x00\x10" * 320))
        converted = resident_wire.frames()
        self.assertTrue(converted)
        self.assertTrue(all(frame[:3] == encode_frame(Kind.SLIN, bytes(320))[:3] for frame in converted))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_dtmfIsNotForwarded(self) -> None:
        visitor, _ = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        visitor.dataReceived(encode_frame(Kind.DTMF, b"7"))
        self.assertEqual(resident_wire.value(), b"")
        self.assertEqual(visitor.dtmf, "7")


class SessionEndTests(SessionTestCase):
    def test_otherLegIsHungUp(self) -> None:
        """When one leg ends, the other is hung up with cause session."""
        visitor, _ = self.leg(Role.VISITOR)
        resident, resident_wire = self.leg(Role.RESIDENT)
        visitor.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(resident_wire.frames()[-1], HANGUP_FRAME)
        self.assertEqual(resident.hangup_cause, HangupCause.SESSION)
        resident.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.registry.session(str(CALL)))
        self.assertEqual(len(self.pacer), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_replacedLegDoesNotEndTheSession(self) -> None:
        self.registry.on_duplicate = "replace"
        old, _ = self.leg(Role.VISITOR)
        resident, resident_wire = self.leg(Role.RESIDENT)
        new, _ = self.leg(Role.VISITOR)
        old.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(old.hangup_cause, HangupCause.REPLACED)
        self.assertNotIn(HANGUP_FRAME, resident_wire.frames())
        self.assertTrue(resident.live and new.live)
        self.assertEqual(self.registry.call(str(CALL)), [new, resident])


class KeepTests(SessionTestCase):
    end_with_leg = False

    def test_otherLegCarriesOn(self) -> None:
        visitor, _ = self.leg(Role.VISITOR)
        resident, resident_wire = self.leg(Role.RESIDENT)
        visitor.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(resident.live)
        self.tick()
        self.assertEqual(resident_wire.frames(), [SLIN.silence_frame])
        self.assertEqual(self.registry.call(str(CALL)), [resident])


class EchoTests(SessionTestCase):
    flow = EchoFlow

    def test_echoIsPaced(self) -> None:
        """Each leg hears its own audio back, one frame per tick, never a burst."""
        leg, wire = self.leg()
        frames = [audio(n) for n in range(5)]
        leg.dataReceived(b"".join(frames))
        self.assertEqual(wire.value(), b"")
        for count in range(1, 6):
            self.tick()
            self.assertEqual(wire.frames(), frames[:count])
        self.tick()
        self.assertEqual(wire.frames()[-1], SLIN.silence_frame)


class SilenceTests(SessionTestCase):
    flow = SilenceFlow

    def test_audioGoesNowhere(self) -> None:
        visitor, visitor_wire = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        visitor.dataReceived(audio(1))
        self.tick(3)
        self.assertEqual(resident_wire.frames(), [SLIN.silence_frame] * 3)
        self.assertEqual(visitor_wire.frames(), [SLIN.silence_frame] * 3)


class PacingTests(SessionTestCase):
    def test_queuedAudioIsPacedWithoutBurst(self) -> None:
        """A large buffer goes out one frame per tick."""
        leg, wire = self.leg()
        leg.play(b"\x01\x02" * 160 * 20)
        self.assertEqual(len(leg.queue), 20)
        self.tick()
        self.assertEqual(len(wire.frames()), 1)
        self.tick(19)
        self.assertEqual(len(wire.frames()), 20)
        self.assertEqual(leg.queued_ms, 0)

    def test_lateTickSkipsMissedFrames(self) -> None:
        """A tick that comes 100 ms late sends one frame, not a burst of five."""
        leg, wire = self.leg()
        leg.play(b"\x01\x02" * 160 * 20)
        self.tick()
        self.clock.advance(0.100)
        self.assertEqual(len(wire.frames()), 2)
        self.assertEqual(self.pacer.late_ticks, 1)

    def test_deadlinesDoNotDrift(self) -> None:
        """The next tick falls on the grid set at start, however late the last one ran."""
        self.leg()
        deadlines = []
        for step in (0.021, 0.025, 0.018, 0.020, 0.037):
            self.clock.advance(step)
            [call] = self.clock.getDelayedCalls()
            deadlines.append(round(call.getTime(), 6))
        self.assertEqual(deadlines, [0.04, 0.06, 0.08, 0.10, 0.14])

    def test_playPadsTheLastFrame(self) -> None:
        leg, wire = self.leg()
        leg.play(b"\x05\x00" * 170)
        self.tick(2)
        first, second = FrameDecoder().feed(wire.value())
        self.assertEqual(len(first.payload), len(second.payload))
        self.assertEqual(second.payload, b"\x05\x00" * 10 + b"\x00" * 300)

    def test_ulawSilence(self) -> None:
        ulaw = LegSettings(audio=FORMATS["ulaw"])
        _, wire = self.leg(settings=ulaw)
        self.tick()
        self.assertEqual(wire.frames(), [encode_frame(Kind.SLIN, b"\xff" * 160)])

    def test_oneTimerForEveryLeg(self) -> None:
        """A thousand live legs share one delayed call: the pacer's."""
        for index in range(1000):
            leg = AudioSocketProtocol(Role.VISITOR, self.registry, self.settings, self.clock, self.pacer)
            leg.makeConnection(Wire())
            leg.dataReceived(encode_uuid(uuid.UUID(int=index)))
        self.assertEqual(len(self.pacer), 1000)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)


class TimeLimitTests(SessionTestCase):
    def test_idleTimeout(self) -> None:
        """A leg that receives no frame for the idle timeout is hung up (idle_timeout)."""
        settings = LegSettings(idle_timeout=1.0)
        leg, wire = self.leg(settings=settings)
        for _ in range(45):
            self.tick()
        leg.dataReceived(audio(1))  # any frame keeps it alive
        self.tick(49)
        self.assertTrue(leg.live)
        self.tick(1)
        self.assertFalse(leg.live)
        self.assertEqual(leg.hangup_cause, HangupCause.IDLE_TIMEOUT)
        self.assertEqual(wire.frames()[-1], HANGUP_FRAME)

    def test_idleTimeoutOffByDefault(self) -> None:
        leg, _ = self.leg()
        self.tick(5000)
        self.assertTrue(leg.live)

    def test_maxDuration(self) -> None:
        """A leg older than the max duration is hung up (max_duration)."""
        leg, wire = self.leg(settings=LegSettings(max_duration=60.0))
        self.clock.advance(59.9)
        self.assertTrue(leg.live)
        self.clock.advance(0.1)
        self.assertEqual(leg.hangup_cause, HangupCause.MAX_DURATION)
        self.assertEqual(wire.frames()[-1], HANGUP_FRAME)
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hangupAfterPlayout(self) -> None:
        """Every queued frame goes out before C{00 00 00}, and nothing after it."""
        leg, wire = self.leg()
        leg.play(b"\x07\x00" * 160 * 5)
        gone = leg.hangupAfterPlayout()
        self.tick(4)
        self.assertTrue(leg.live)
        self.tick(1)
        frames = wire.frames()
        self.assertEqual(len(frames), 6)
        self.assertTrue(all(frame[3:5] == b"\x07\x00" for frame in frames[:5]))
        self.assertEqual(frames[5], HANGUP_FRAME)
        self.tick(10)
        self.assertEqual(len(wire.frames()), 6)
        leg.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.successResultOf(gone), CloseReason.HANGUP_RESET)

    def test_hangupAfterPlayoutWithNothingQueued(self) -> None:
        leg, wire = self.leg()
        leg.hangupAfterPlayout()
        self.assertEqual(wire.frames(), [HANGUP_FRAME])

    def test_playoutTimeout(self) -> None:
        """Playout that cannot finish in time is cut short by a hangup."""
        leg, wire = self.leg(settings=LegSettings(playout_timeout=0.51, max_queue_ms=2000))
        leg.play(b"\x07\x00" * 160 * 100)
        leg.hangupAfterPlayout()
        self.tick(25)
        self.assertTrue(leg.live)
        self.clock.advance(0.01)
        self.assertFalse(leg.live)
        self.assertEqual(leg.hangup_cause, HangupCause.API)
        self.assertEqual(wire.frames()[-1], HANGUP_FRAME)
        self.assertEqual(len(wire.frames()), 26)


class PlayoutBoundTests(SessionTestCase):
    def test_secondRequestDoesNotPushTheBoundBack(self) -> None:
        """Asking again for a hangup after playout keeps the first deadline."""
        leg, wire = self.leg(settings=LegSettings(playout_timeout=0.5, max_queue_ms=2000))
        leg.play(b"\x07\x00" * 160 * 100)
        leg.hangupAfterPlayout()
        self.clock.advance(0.3)
        leg.play(b"\x07\x00" * 160 * 10)
        leg.hangupAfterPlayout()
        self.clock.advance(0.2)
        self.assertFalse(leg.live)
        self.assertEqual(wire.frames()[-1], HANGUP_FRAME)


class QueueTests(SynchronousTestCase):
    def test_overflowDropsTheOldest(self) -> None:
        queue = FrameQueue(max_frames=3)
        self.assertEqual(queue.push([b"1", b"2"]), 0)
        self.assertEqual(queue.push([b"3", b"4"]), 1)
        self.assertEqual([queue.popleft() for _ in range(len(queue))], [b"2", b"3", b"4"])
        self.assertEqual(queue.push([b"5", b"6", b"7", b"8", b"9"]), 2)
        self.assertEqual([queue.popleft() for _ in range(len(queue))], [b"7", b"8", b"9"])
        self.assertEqual(queue.dropped, 3)

    def test_legQueueIsBounded(self) -> None:
        """A leg queues at most --max-queue-ms of audio and counts what it drops."""
        registry = Registry()
        clock = Clock()
        leg = AudioSocketProtocol(Role.VISITOR, registry, LegSettings(max_queue_ms=100), clock, Pacer(clock))
        leg.makeConnection(Wire())
        leg.dataReceived(encode_uuid(CALL))
        self.assertEqual(leg.play(b"\x01\x00" * 160 * 4), 0)
        self.assertEqual(leg.play(b"\x02\x00" * 160 * 4), 3)
        self.assertEqual((leg.queued_ms, leg_view(leg)["dropped_frames"]), (100, 3))
        self.assertEqual(leg.queue.popleft()[3:5], b"\x01\x00")


class FlowLoadingTests(SynchronousTestCase):
    def test_builtins(self) -> None:
        for name, factory in BUILTIN_FLOWS.items():
            self.assertIs(load_flow(name), factory)
            verifyObject(IFlow, factory())

    def test_dottedPath(self) -> None:
        self.assertIs(load_flow("audiohangup.flows.EchoFlow"), EchoFlow)

    def test_flowWithoutHooksMeansSilence(self) -> None:
        """A factory whose product lacks the hooks is caught once, when the session is made."""
        session = Session.create(str(CALL), object, end_with_leg=True)
        self.assertIsInstance(session.flow, SilenceFlow)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_errors(self) -> None:
        for name, words in [
            ("bridges", "unknown flow"),
            ("audiohangup.flows.Nope", "cannot load"),
            ("no_such_module_xyz.Flow", "cannot load"),
            ("audiohangup.flows.BUILTIN_FLOWS", "not a class"),
            ("audiohangup.flows.FlowLoadError", "does not provide"),
        ]:
            with self.assertRaises(FlowLoadError) as caught:
                load_flow(name)
            self.assertIn(words, str(caught.exception))
