"""
A media stream's rules without a socket: a leg on a StringTransport, one
Clock for the leg, the pacer and the stream, and a recording stand-in for
the WebSocket. What is sent when, what is played when, what is dropped.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import deque
from typing import Any

from autobahn.exception import Disconnected
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from audiohangup.audio import FORMATS, LegSettings, Playout
from audiohangup.codecs import decode as g711_decode
from audiohangup.codecs import encode as g711_encode
from audiohangup.http.errors import refusal
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.registry import Registry
from audiohangup.streams import client
from audiohangup.streams.client import _ClientFactory, _StreamWebSocket
from audiohangup.streams.manager import (
    BadStreamField,
    BadStreamURL,
    StreamConfig,
    Streams,
    check_headers,
    check_url,
    parse_header,
    redact,
)
from audiohangup.streams.native import AudiohangupProtocol
from audiohangup.streams.stream import IStreamWebSocket, MediaStream, Mode, Outcome, State, StreamSettings
from audiohangup.streams.twilio import TwilioProtocol
from audiohangup.wire import HANGUP_FRAME, FrameDecoder, Kind, encode_frame, encode_uuid

CALL = uuid.UUID("3f1c2b4a-5d6e-4f70-8a9b-0c1d2e3f4a5b")
SLIN = FORMATS["slin"]


def samples(value: int, count: int = 160) -> bytes:
    return value.to_bytes(2, "little", signed=True) * count


@implementer(IStreamWebSocket)
class FakeWire:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bool, bool]] = []
        self.closed: tuple[int, str] | None = None

    def send(self, message: tuple[bytes, bool], media: bool) -> None:
        self.sent.append((message[0], message[1], media))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for payload, binary, _ in self.sent if not binary]

    def events(self) -> list[str]:
        return [message["event"] for message in self.json()]


class Observer:
    def __init__(self) -> None:
        self.started: list[MediaStream] = []
        self.ended: list[MediaStream] = []

    def streamStarted(self, stream: MediaStream) -> None:
        self.started.append(stream)

    def streamEnded(self, stream: MediaStream) -> None:
        self.ended.append(stream)


class StreamTestCase(SynchronousTestCase):
    protocol = "audiohangup"
    mode = Mode.CONVERSE
    settings = StreamSettings(max_queue_ms=1000)

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.registry = Registry()
        self.leg = AudioSocketProtocol(Role.VISITOR, self.registry, LegSettings(), self.clock, self.pacer)
        self.transport = StringTransport()
        self.leg.makeConnection(self.transport)
        self.leg.dataReceived(encode_uuid(CALL))
        self.transport.clear()
        self.observer = Observer()
        self.stream = self.make(self.mode)
        self.wire = self.openWire()
        self.stream.opened(self.wire)

    def openWire(self) -> Any:
        return FakeWire()

    def make(self, mode: Mode, settings: StreamSettings | None = None) -> MediaStream:
        if self.protocol == "twilio":
            wire: Any = TwilioProtocol("MZ1", str(CALL), SLIN, {"role": "visitor"}, self.clock)
        else:
            wire = AudiohangupProtocol("MZ1", str(CALL), "visitor", SLIN, {"site": "gate"})
        stream = MediaStream(
            self.leg, "MZ1", "ws://app/x?k=1", "ws://app/x", wire, mode, settings or self.settings, self.observer
        )
        self.leg.addTap(stream)
        self.leg.addStream(stream)
        return stream

    def frames(self) -> list[bytes]:
        """The payloads written to the leg since the last look."""
        payloads = [frame.payload for frame in FrameDecoder().feed(self.transport.value())]
        self.transport.clear()
        return payloads

    def tick(self, count: int = 1) -> None:
        for _ in range(count):
            self.clock.advance(0.020)

    def app(self, *messages: dict[str, Any] | bytes) -> None:
        for message in messages:
            if isinstance(message, bytes):
                self.stream.messageReceived(message, True)
            else:
                self.stream.messageReceived(json.dumps(message).encode(), False)


class NativeTests(StreamTestCase):
    def test_opening(self) -> None:
        self.assertEqual(
            self.wire.json(),
            [{
                "event": "start", "stream_id": "MZ1", "call_id": str(CALL), "role": "visitor",
                "format": {"encoding": "L16", "sample_rate": 8000, "channels": 1}, "parameters": {"site": "gate"},
            }],
        )
        self.assertEqual(self.observer.started, [self.stream])
        self.assertIs(self.stream.state, State.STREAMING)

    def test_legAudioGoesOutAsItCame(self) -> None:
        for value in (1, 2, 3):
            self.leg.dataReceived(encode_frame(Kind.SLIN, samples(value)))
        media = [(payload, binary, media) for payload, binary, media in self.wire.sent if binary]
        self.assertEqual(media, [(samples(v), True, True) for v in (1, 2, 3)])
        self.leg.dataReceived(encode_frame(Kind.DTMF, b"5"))
        self.assertEqual(self.wire.json()[-1], {"event": "dtmf", "digit": "5"})

    def test_appAudioIsPacedAfterPromptsAndHasTheFloor(self) -> None:
        """Cut into 20 ms frames, one per tick; a /play prompt first; bridged audio waits."""
        self.leg.play(samples(9))
        self.app(samples(1) + samples(2) + samples(3)[:100])  # two frames and a bit
        self.assertTrue(self.leg.feed)
        self.tick()
        self.assertEqual(self.frames(), [samples(9)])
        self.tick()
        self.assertEqual(self.frames(), [samples(1)])
        self.leg.forward(FrameDecoder().feed(encode_frame(Kind.SLIN, samples(7)))[0])  # the bridge: not now
        self.assertEqual(self.frames(), [])
        self.tick(2)
        self.assertEqual(self.frames(), [samples(2), SLIN.silence_frame[3:]])  # the bit waits for the rest
        self.app(samples(3)[100:])
        self.tick()
        self.assertEqual(self.frames(), [samples(3)])

    def test_markAfterItsAudio(self) -> None:
        self.app(samples(1) * 2, {"event": "mark", "name": "greeting"})
        self.assertNotIn("mark", self.wire.events())
        self.tick()
        self.assertNotIn("mark", self.wire.events())
        self.tick()
        self.assertEqual(self.frames(), [samples(1), samples(1)])
        self.assertEqual(self.wire.json()[-1], {"event": "mark", "name": "greeting"})

    def test_markWithNothingQueuedIsAnsweredAtOnce(self) -> None:
        self.app({"event": "mark", "name": "now"})
        self.assertEqual(self.wire.json()[-1], {"event": "mark", "name": "now"})

    def test_partialFrameBeforeAMarkIsPaddedAndPlayed(self) -> None:
        self.app(samples(4)[:200], {"event": "mark", "name": "end"})
        self.tick()
        self.assertEqual(self.frames(), [samples(4)[:200] + bytes(120)])
        self.assertEqual(self.wire.json()[-1], {"event": "mark", "name": "end"})

    def test_clearDropsAtOnceAndAnswersMarks(self) -> None:
        self.app(samples(1) * 10, {"event": "mark", "name": "a"}, samples(2) * 10, {"event": "mark", "name": "b"})
        self.tick()
        self.assertEqual(self.frames(), [samples(1)])
        self.app({"event": "clear"})
        self.assertEqual([m["name"] for m in self.wire.json() if m["event"] == "mark"], ["a", "b"])
        self.assertFalse(self.leg.feed)
        self.tick()
        self.assertEqual(self.frames(), [SLIN.silence_frame[3:]])
        self.assertEqual(self.stream.totals().dropped_from_app, 19)

    def test_queueIsBoundedOldestDropped(self) -> None:
        self.app(b"".join(samples(v) for v in range(60)))  # 1.2 s into a 1 s queue
        self.assertEqual(self.stream.totals().dropped_from_app, 10)
        self.tick()
        self.assertEqual(self.frames(), [samples(10)])

    def test_hangupFromTheApp(self) -> None:
        self.app({"event": "hangup"})
        self.assertEqual(self.transport.value(), HANGUP_FRAME)
        self.assertEqual(self.leg.hangup_cause, HangupCause.STREAM)

    def test_hangupAfterPlayout(self) -> None:
        self.app(samples(1) * 2 + samples(2)[:10], {"event": "hangup", "after_playout": True})
        self.assertIsNone(self.leg.hangup_cause)
        self.tick(3)
        frames = self.frames()
        self.assertEqual(frames[:2], [samples(1), samples(1)])
        self.assertEqual(frames[2], samples(2)[:10] + bytes(310))
        self.assertEqual(frames[3], b"")  # then 00 00 00, and nothing after it
        self.assertEqual(self.leg.hangup_cause, HangupCause.STREAM)

    def test_badMessagesAreIgnoredAndLoggedOnce(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for bad in (b"\xff\xfe", b"[1]", b'{"no":"event"}', b"not json"):
            self.stream.messageReceived(bad, False)
        self.stream.messageReceived(b"\x01\x02\x03", True)  # an odd number of bytes of L16
        self.app({"event": "mark"})  # no name
        self.app({"event": "something-new"})  # read and ignored, no log
        [warned] = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertIn("a text message that is not JSON", formatEvent(warned))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertIs(self.stream.state, State.STREAMING)

    def test_legEndSendsStopThenClose(self) -> None:
        self.app(samples(1) * 3, {"event": "mark", "name": "pending"})
        self.stream.stop("the leg ended")
        self.assertEqual(self.wire.events()[-2:], ["mark", "stop"])  # the mark is answered: that audio is gone
        self.assertEqual(self.wire.json()[-1], {"event": "stop", "reason": "the leg ended"})
        self.assertEqual(self.wire.closed, (1000, "the leg ended"))
        self.assertIs(self.stream.state, State.STOPPING)
        self.assertIsNone(self.leg.feed)
        self.assertNotIn(self.stream, self.leg.taps)
        self.stream.closed(True, 1000, "")
        self.assertEqual((self.stream.state, self.stream.outcome), (State.ENDED, Outcome.ENDED))
        self.assertEqual(self.observer.ended, [self.stream])
        self.assertTrue(self.leg.live)

    def test_appClosing(self) -> None:
        self.stream.closed(True, 1000, "bye")
        self.assertEqual(self.stream.outcome, Outcome.APP_CLOSED)
        self.assertTrue(self.leg.live)

    def test_appVanishing(self) -> None:
        self.stream.closed(False, 1006, "peer dropped the TCP connection")
        self.assertEqual((self.stream.outcome, self.stream.state), (Outcome.FAILED, State.FAILED))
        self.assertTrue(self.leg.live)

    def test_failureHangsUpWhenAsked(self) -> None:
        stream = self.make(Mode.LISTEN, StreamSettings(failure="hangup"))
        stream.connectFailed("connection refused")
        self.assertEqual(stream.outcome, Outcome.FAILED)
        self.assertEqual(self.leg.hangup_cause, HangupCause.STREAM)

    def test_stoppedWhileConnecting(self) -> None:
        stream = self.make(Mode.LISTEN)
        stream.stop("deleted")
        self.assertEqual(stream.outcome, Outcome.ENDED)
        wire = FakeWire()
        stream.opened(wire)  # the connection came up anyway: closed at once, nothing sent
        self.assertEqual((wire.sent, wire.closed), ([], (1000, "the stream was ended")))

    def test_legClosingDrainsAndAnswers(self) -> None:
        self.app(samples(1) * 3, {"event": "mark", "name": "m"})
        self.leg.hangup(HangupCause.API)
        self.assertEqual(self.wire.json()[-1], {"event": "mark", "name": "m"})
        self.leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.leg.close_reason, CloseReason.HANGUP_CLEAN)
        self.stream.stop("the leg ended")
        self.assertEqual(self.stream.counts.dropped_from_app, 3)  # the leg drained them first: still counted


class MarkBoundTests(StreamTestCase):
    """What a mark can make us hold: its name (at most 256 bytes), and how many wait for their audio."""

    def test_longNameIsIgnored(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.app({"event": "mark", "name": "x" * 257}, {"event": "mark", "name": "é" * 129})  # 258 bytes
        self.app({"event": "mark", "name": "\ud800" * 300})  # a lone surrogate JSON allows: no UnicodeError
        self.assertNotIn("mark", self.wire.events())
        [warned] = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertIn("a mark name over 256 bytes", formatEvent(warned))
        self.app({"event": "mark", "name": "y" * 256})
        self.assertEqual(self.wire.json()[-1], {"event": "mark", "name": "y" * 256})
        self.assertIs(self.stream.state, State.STREAMING)

    def test_marksWaitingForAudioAreBounded(self) -> None:
        """A full queue's worth (50 frames here, at least 64): the marks beyond it are ignored, the rest answered."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.app(samples(1))
        self.app(*({"event": "mark", "name": f"m{n}"} for n in range(100)))
        self.assertEqual(self.stream.settings.max_marks_waiting, 64)
        self.assertEqual(len(self.leg.feed or ()), 1 + 64)
        self.assertTrue([e for e in events if "a mark beyond 64 waiting" in formatEvent(e)])
        self.tick(2)
        self.assertEqual([m["name"] for m in self.wire.json() if m["event"] == "mark"], [f"m{n}" for n in range(64)])
        self.app(samples(2), {"event": "mark", "name": "again"})  # answered marks free their places
        self.tick(2)
        self.assertEqual(self.wire.json()[-1], {"event": "mark", "name": "again"})


class TimelineTests(StreamTestCase):
    """
    One timeline per leg: whatever feeds it, a leg gets one frame a tick; after
    a stall the audio that was due is dropped, and the leg is on time again.
    The app's audio here takes the floor (the default, C{--stream-audio floor}).
    """

    settings = StreamSettings(max_queue_ms=10000)

    def tick(self, count: int = 1) -> None:
        for _ in range(count):
            self.clock.advance(0.020 + 1e-9)  # a hair past each tick: float sums never fall short of one

    def bridged(self, value: int) -> None:
        """A frame bridged to the leg from its other leg, as the route delivers it."""
        self.leg.forwardBytes(encode_frame(Kind.SLIN, samples(value)))

    def slots(self, ticks: int, app_every: int | None = None) -> list[list[bytes]]:
        """
        C{ticks} ticks, the bridge sending a frame 7 ms into each slot and the
        app one every C{app_every} ticks 13 ms into it; what each slot wrote.
        """
        slots = []
        for n in range(ticks):
            self.clock.advance(0.007)
            self.bridged(2000)
            self.clock.advance(0.006)
            if app_every is not None and n % app_every == 0:
                self.app(samples(1000))
            self.clock.advance(0.007 + 1e-9)  # the tick (a hair past it: float sums)
            slots.append(self.frames())
        return slots

    def test_appAtHalfRealTimeAndTheBridgeOneFrameASlot(self) -> None:
        """
        An app at half real time: its frame plays at the tick after it, the
        bridge's in the other slots; the bridged frame of a slot the app's
        frame had waits for the next tick, and is dropped if the app has a
        frame then. Never two frames in a slot (there were three in two).
        """
        slots = self.slots(100, app_every=2)
        self.assertEqual([len(written) for written in slots[1:]], [1] * 99)
        heard = [written[0] for written in slots[1:]]
        self.assertEqual(heard[:4], [samples(2000), samples(1000)] * 2)
        self.assertEqual(heard.count(samples(1000)), 49)  # the first one went before slots[1]

    def test_appInBursts(self) -> None:
        """Ten frames at once, then a pause, over a live bridge: one frame a tick throughout."""
        for _ in range(3):
            self.app(samples(1000) * 10)
            slots = self.slots(20)
            self.assertEqual([len(written) for written in slots], [1] * 20)
            self.assertEqual([written[0] for written in slots[:10]], [samples(1000)] * 10)
            self.assertEqual({written[0] for written in slots[11:]}, {samples(2000)})

    def test_bridgeBurstIsHeldToTheTicks(self) -> None:
        """
        Three bridged frames in a slot that had the app's frame: held for the
        next ticks, the newest two (a bridge at most two frames behind).
        Long after the app's last frame, the bridge goes through as it comes.
        """
        self.app(samples(9))
        self.tick()
        self.assertEqual(self.frames(), [samples(9)])
        for value in (1, 2, 3):
            self.bridged(value)
        self.assertEqual(self.frames(), [])
        self.tick()
        self.assertEqual(self.frames(), [samples(2)])
        self.tick()
        self.assertEqual(self.frames(), [samples(3)])
        self.tick(10)  # SPOKEN_TICKS
        self.frames()
        for value in (4, 5, 6):
            self.bridged(value)
        self.assertEqual(self.frames(), [samples(4), samples(5), samples(6)])

    def test_lateTickDropsWhatWasDue(self) -> None:
        """
        Three seconds in one message play a frame a tick; a 300 ms stall drops
        the 14 frames due in the slots it missed, and the rest plays on time:
        the sentence ends when it would have without the stall.
        """
        self.app(b"".join(samples(n) for n in range(1, 151)))
        self.tick(10)
        self.assertEqual(self.frames(), [samples(n) for n in range(1, 11)])
        self.clock.advance(0.300)  # the ticks due in the next 300 ms run once, at its end
        self.assertEqual(self.pacer.late_ticks, 1)
        self.assertEqual(self.frames(), [samples(25)])  # 11 to 24 were due in the missed slots
        self.tick(125)
        self.assertEqual(self.frames(), [samples(n) for n in range(26, 151)])
        self.assertEqual(self.stream.totals().dropped_from_app, 14)

    def test_stallOfARealTimeAppIsCaughtUp(self) -> None:
        """
        An app speaking in real time: what it sent during the stall is read
        only after the late tick, and is dropped then; the leg's delay is
        back to a frame.
        """
        self.app(samples(1))
        for n in range(2, 12):
            self.tick()
            self.app(samples(n))
        self.assertEqual(len(self.leg.feed or ()), 1)
        self.frames()
        self.clock.advance(0.300)
        self.app(b"".join(samples(n) for n in range(12, 27)))  # the 15 frames of the stall, read late
        self.tick()
        # 11 to 24 were due in the stall, 25 at the late tick, which had nothing to play: silence.
        self.assertEqual(self.frames(), [SLIN.silence_frame[3:], samples(26)])
        self.assertEqual(len(self.leg.feed or ()), 0)

    def test_catchUpEndsAfterAFewTicks(self) -> None:
        """Audio that comes well after a stall is not late: a sentence sent then plays whole."""
        self.clock.advance(0.300)
        self.tick(5)  # CATCH_UP_TICKS
        self.frames()
        self.app(b"".join(samples(n) for n in range(1, 21)))
        self.tick(20)
        self.assertEqual(self.frames(), [samples(n) for n in range(1, 21)])

    def realTime(self, values: range, at: float = 0.013) -> list[list[bytes]]:
        """The app sends a frame C{at} into each slot, as a real-time stream does; what each slot wrote."""
        slots = []
        for value in values:
            self.clock.advance(at)
            self.app(samples(value))
            self.clock.advance(0.020 - at + 1e-9)
            slots.append(self.frames())
        return slots

    def test_standingQueueOfARealTimeAppIsTrimmed(self) -> None:
        """
        A real-time app whose first six frames came at once keeps six queued
        for good: each frame waits six ticks more than it needs. After a
        window that never ran out, the six are dropped: its frames play at
        the tick after they come, one frame a tick throughout.
        """
        self.app(b"".join(samples(n) for n in range(1, 7)))
        slots = self.realTime(range(7, 107))
        self.assertEqual([len(written) for written in slots], [1] * 100)
        feed = self.leg.feed
        assert feed is not None
        self.assertEqual(feed.trimmed, 6)
        self.assertEqual(slots[-10:], [[samples(n)] for n in range(97, 107)])  # each in the slot it came
        self.assertEqual(self.stream.totals().dropped_from_app, 6)

    def test_audioAheadOfRealTimeIsNotTrimmed(self) -> None:
        """A sentence streamed in 20 ms messages twice as fast as it plays: every frame plays, in order."""
        for n in range(1, 101, 2):
            self.clock.advance(0.013)
            self.app(samples(n))
            self.app(samples(n + 1))
            self.clock.advance(0.007 + 1e-9)
        self.tick(60)
        played = [frame for frame in self.frames() if frame != SLIN.silence_frame[3:]]
        self.assertEqual(played, [samples(n) for n in range(1, 101)])

    def test_anAppOnThePacersPhaseKeepsACushion(self) -> None:
        """
        An app whose frames come on the tick, now just before it, now just
        after: trimmed to none, it runs out again, so from then on one frame
        stays queued and nothing more is trimmed.
        """
        self.app(samples(1))
        late = {40, 110, 180, 250}  # these come a hair after their tick
        for n in range(2, 300):
            at = 0.0205 if n in late else 0.0195
            self.clock.advance(at)
            self.app(samples(n))
            self.clock.advance(0.020 - at + 1e-9)
        feed = self.leg.feed
        assert feed is not None
        self.assertEqual(feed.cushion, 1)
        self.assertEqual(feed.trimmed, 1)  # the one trim that found the phase: never again


class MixTests(TimelineTests):
    """C{--stream-audio mix}: the app's frame and the bridge's are summed, each slot one frame."""

    settings = StreamSettings(max_queue_ms=10000, audio="mix")

    def test_appAtHalfRealTimeAndTheBridgeOneFrameASlot(self) -> None:
        slots = self.slots(100, app_every=2)
        self.assertEqual([len(written) for written in slots[1:]], [1] * 99)
        heard = [written[0] for written in slots[1:]]
        self.assertEqual(heard[:4], [samples(2000), samples(3000)] * 2)  # every bridged frame heard

    def test_appInBursts(self) -> None:
        for _ in range(3):
            self.app(samples(1000) * 10)
            slots = self.slots(20)
            self.assertEqual([len(written) for written in slots], [1] * 20)
            self.assertEqual([written[0] for written in slots[1:10]], [samples(3000)] * 9)
            self.assertEqual({written[0] for written in slots[11:]}, {samples(2000)})

    def test_sumSaturates(self) -> None:
        self.app(samples(30000) + samples(-30000))
        self.bridged(30000)  # the app has audio: held for the tick
        self.tick()
        self.bridged(-30000)
        self.tick()
        self.assertEqual(self.frames(), [samples(32767), samples(-32768)])

    def test_g711Leg(self) -> None:
        """A u-law leg: the app's frame and the bridge's are decoded, summed and encoded back."""
        ulaw = FORMATS["ulaw"]
        leg = AudioSocketProtocol(Role.RESIDENT, self.registry, LegSettings(audio=ulaw), self.clock, self.pacer)
        transport = StringTransport()
        leg.makeConnection(transport)
        leg.dataReceived(encode_uuid(uuid.uuid4()))
        feed = Playout(50, mix=True)
        leg.attachFeed(feed)
        feed.push([encode_frame(ulaw.kind, g711_encode(samples(6000), ulaw))])
        leg.forwardBytes(encode_frame(ulaw.kind, g711_encode(samples(-2000), ulaw)))  # the app has audio: held
        transport.clear()
        self.tick()
        [frame] = FrameDecoder().feed(transport.value())
        heard = g711_decode(frame.payload, ulaw)
        self.assertEqual(len(frame.payload), 160)
        self.assertTrue(all(abs(int.from_bytes(heard[i : i + 2], "little", signed=True) - 4000) < 200 for i in range(0, 320, 2)))


class OutboxTests(StreamTestCase):
    """
    An app that does not read: its socket's buffer is full, the transport has
    paused the wire, and what the stream sends waits in the wire's outbox.
    Media is dropped oldest first; control messages are not, and fail the
    stream once more than 1 MiB of them wait.
    """

    mode = Mode.LISTEN  # marks answered at once: each mark is an answer waiting
    settings = StreamSettings(max_queue_ms=1000, failure="hangup")

    def openWire(self) -> Any:
        self.socket = StringTransport()
        protocol = _ClientFactory(self.stream, self.clock, 10, url="ws://127.0.0.1:1/").buildProtocol(None)
        protocol.makeConnection(self.socket)
        protocol.state = WebSocketProtocol.STATE_OPEN
        wire = protocol.websocket = _StreamWebSocket(protocol, self.stream, 10)
        self.socket.registerProducer(wire, True)
        wire.pauseProducing()  # the app does not read
        self.socket.clear()
        return wire

    def test_mediaIsDroppedOldestFirst(self) -> None:
        for value in range(25):
            self.leg.dataReceived(encode_frame(Kind.SLIN, samples(value)))
        self.assertEqual(self.wire.media_waiting, 10)
        self.assertEqual(self.stream.counts.dropped_to_app, 15)
        self.assertEqual(self.wire.bytes_waiting, sum(len(payload) for payload, _, _ in self.wire.outbox))
        self.assertIs(self.stream.state, State.STREAMING)

    def test_controlMessagesFailTheStreamPastTheirBound(self) -> None:
        name = "n" * 256
        answer = len(json.dumps({"event": "mark", "name": name}, separators=(",", ":")))
        start = self.wire.control_waiting
        fits = (client.MAX_CONTROL_UNSENT - start) // answer
        highest = 0
        for _ in range(fits):
            self.app({"event": "mark", "name": name})
            highest = max(highest, self.wire.bytes_waiting)
        self.assertIs(self.stream.state, State.STREAMING)
        self.assertLessEqual(highest, client.MAX_CONTROL_UNSENT)
        self.app({"event": "mark", "name": name})  # one more: over the bound
        self.assertEqual((self.stream.state, self.stream.outcome), (State.FAILED, Outcome.FAILED))
        self.assertTrue(self.stream.reason.startswith("slow_app: the app does not read"), self.stream.reason)
        self.assertEqual((self.wire.outbox, self.wire.bytes_waiting), (deque(), 0))
        self.assertTrue(self.socket.disconnecting)  # dropped, not a closing handshake it would not read
        self.assertEqual(self.observer.ended, [self.stream])
        self.assertEqual(self.leg.hangup_cause, HangupCause.STREAM)  # --stream-failure hangup
        self.app({"event": "mark", "name": name})  # after it: nothing held, nothing raised
        self.assertEqual(self.wire.outbox, deque())

    def test_onePongForManyPings(self) -> None:
        """RFC 6455 5.5.3: while paused, only the latest ping is kept, and answered once writing resumes."""
        for n in range(1000):
            self.wire.protocol.onPing(b"%d" % n)
        self.assertEqual((self.socket.value(), self.wire.ping), (b"", b"999"))
        self.wire.resumeProducing()
        written = self.socket.value()
        self.assertEqual(written[:2], b"\x8a\x83")  # one pong: masked, 3 bytes (b"999")
        self.assertEqual(written[9:10], b"\x81")  # then the outbox: the start message
        self.assertIsNone(self.wire.ping)


class ClosingWebSocketTests(StreamTestCase):
    """
    The app's Close has arrived, the TCP connection has not gone yet: autobahn
    refuses to send (it raises Disconnected) while the stream still streams.
    The stream's wire drops what it sends meanwhile; nothing raises into the
    pacer, the leg or the API.
    """

    def openWire(self) -> Any:
        protocol = _ClientFactory(self.stream, self.clock, 10, url="ws://127.0.0.1:1/").buildProtocol(None)
        protocol.state = WebSocketProtocol.STATE_OPEN
        wire = _StreamWebSocket(protocol, self.stream, 10)
        wire.paused = True  # what is sent while open waits in the outbox: there is no transport here
        return wire

    def test_nothingRaisesAndTheLegStaysPaced(self) -> None:
        observer = EventLoggingObserver()
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.app(samples(1) * 2, {"event": "mark", "name": "bye"})
        self.wire.protocol.state = WebSocketProtocol.STATE_CLOSING  # the app's Close arrives
        self.leg.dataReceived(encode_frame(Kind.SLIN, samples(5)))  # media for the app
        self.leg.dataReceived(encode_frame(Kind.DTMF, b"4"))
        self.tick(4)  # the app's audio plays out and its mark is answered
        self.assertEqual(self.frames()[:2], [samples(1), samples(1)])
        self.assertIn(self.leg, self.pacer._legs)
        self.assertTrue(self.leg.live)
        self.wire.resumeProducing()  # the outbox has nowhere to go
        self.assertEqual(self.wire.outbox, deque())
        self.stream.stop("the leg ended")  # its stop and close are dropped: the handshake is under way
        self.assertIs(self.stream.state, State.STOPPING)
        self.assertEqual([e for e in observer if e.get("log_failure") or e["log_level"] >= LogLevel.error], [])
        self.tick(3)
        self.assertIn(self.leg, self.pacer._legs)

    def test_sendRaisesWithoutTheCheck(self) -> None:
        """The premise: autobahn itself raises on a send in this state."""
        with self.assertRaises(Disconnected):
            self.wire.protocol.state = self.wire.protocol.STATE_CLOSING
            self.wire.protocol.sendMessage(b"x", isBinary=True)


class ListenTests(StreamTestCase):
    mode = Mode.LISTEN

    def test_appAudioIsIgnoredAndCounted(self) -> None:
        self.app(samples(5) * 4, {"event": "mark", "name": "x"})
        self.assertIsNone(self.leg.feed)
        self.tick()
        self.assertEqual(self.frames(), [SLIN.silence_frame[3:]])
        self.assertEqual(self.stream.counts.ignored_from_app, 4)
        self.assertEqual(self.wire.json()[-1], {"event": "mark", "name": "x"})

    def test_aListenerCannotHangUpOrTakeTheFeed(self) -> None:
        """A fork only hears: its hangup is ignored (counted, logged once) and its clear takes no feed."""
        self.app({"event": "clear"}, {"event": "hangup", "after_playout": False})
        self.app({"event": "hangup", "after_playout": True})
        self.tick()
        self.assertTrue(self.leg.live)
        self.assertIsNone(self.leg.hangup_cause)
        self.assertIsNone(self.leg.feed)  # a converse stream opened later can still speak
        self.assertEqual(self.stream.counts.ignored_from_app, 2)


class TwilioTests(StreamTestCase):
    protocol = "twilio"

    def test_opening(self) -> None:
        connected, start = self.wire.json()
        self.assertEqual(connected, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.assertEqual(start, {
            "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
            "start": {
                "streamSid": "MZ1", "accountSid": "", "callSid": str(CALL), "tracks": ["inbound"],
                "customParameters": {"role": "visitor"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        })

    def test_mediaIsMulawWithSequenceChunkAndTimestamp(self) -> None:
        self.clock.advance(0.040)
        self.leg.dataReceived(encode_frame(Kind.SLIN, samples(1000)))
        self.clock.advance(0.020)
        self.leg.dataReceived(encode_frame(Kind.SLIN, samples(-1000)))
        self.leg.dataReceived(encode_frame(Kind.DTMF, b"#"))
        first, second, dtmf = self.wire.json()[2:]
        self.assertEqual(
            {k: first["media"][k] for k in ("track", "chunk", "timestamp")},
            {"track": "inbound", "chunk": "1", "timestamp": "40"},
        )
        self.assertEqual((first["sequenceNumber"], second["sequenceNumber"], second["media"]["chunk"]), ("2", "3", "2"))
        self.assertEqual(base64.b64decode(first["media"]["payload"]), g711_encode(samples(1000), FORMATS["ulaw"]))
        self.assertEqual(base64.b64decode(second["media"]["payload"]), g711_encode(samples(-1000), FORMATS["ulaw"]))
        self.assertEqual(dtmf, {
            "event": "dtmf", "sequenceNumber": "4", "streamSid": "MZ1", "dtmf": {"track": "inbound_track", "digit": "#"},
        })

    def test_appMediaOfAnyLengthAndMarks(self) -> None:
        ulaw = g711_encode(samples(2000, 240), FORMATS["ulaw"])  # 30 ms
        self.app({"event": "media", "streamSid": "whatever", "media": {"payload": base64.b64encode(ulaw).decode()}})
        self.app({"event": "mark", "mark": {"name": "m1"}})
        self.tick(2)
        played = self.frames()
        self.assertEqual(len(played), 2)
        expected = g711_decode(ulaw, FORMATS["ulaw"])  # same rate: no resampler, exact
        self.assertEqual(played, [expected[:320], expected[320:] + bytes(160)])  # the last 10 ms padded
        mark = self.wire.json()[-1]
        self.assertEqual((mark["event"], mark["mark"], mark["sequenceNumber"]), ("mark", {"name": "m1"}, "2"))

    def test_appCommands(self) -> None:
        for bad in ({"event": "media"}, {"event": "media", "media": {"payload": "%%%"}}, {"event": "mark", "mark": {}}):
            self.app(bad)
        self.stream.messageReceived(b"\x00", True)
        self.app({"event": "start"})  # Twilio's own events, read and ignored
        self.assertIs(self.stream.state, State.STREAMING)
        self.app({"event": "hangup", "afterPlayout": False})
        self.assertEqual(self.leg.hangup_cause, HangupCause.STREAM)

    def test_stop(self) -> None:
        self.stream.stop("the leg ended")
        self.assertEqual(self.wire.json()[-1], {
            "event": "stop", "sequenceNumber": "2", "streamSid": "MZ1", "stop": {"accountSid": "", "callSid": str(CALL)},
        })


class PlayoutTests(SynchronousTestCase):
    def test_boundAndMarks(self) -> None:
        answered: list[str] = []
        playout = Playout(max_frames=2)
        playout.mark(lambda: answered.append("empty"))
        self.assertEqual(answered, ["empty"])
        playout.push([b"1"])
        playout.mark(lambda: answered.append("after 1"))
        self.assertEqual(playout.push([b"2", b"3"]), 1)  # 1 dropped: its mark answered
        self.assertEqual(answered, ["empty", "after 1"])
        self.assertEqual((playout.nextFrame(), playout.nextFrame(), playout.nextFrame()), (b"2", b"3", None))
        self.assertEqual(playout.dropped, 1)


class ManagerTests(StreamTestCase):
    mode = Mode.LISTEN  # the base's stream only listens: the converse slot is free

    def test_connectRaisingFailsTheStream(self) -> None:
        """A URL the WebSocket client refuses at once: a failed stream, not one connecting for ever."""
        def refuse(stream: MediaStream, *args: Any, **kwargs: Any) -> None:
            raise ValueError("invalid WebSocket URL: non-empty fragment 'token=secret'")

        self.patch(client, "connect", refuse)
        streams = Streams(StreamConfig(), self.clock)
        first = streams.open(self.leg, "ws://app/x")
        self.assertEqual((first.state, first.outcome), (State.FAILED, Outcome.FAILED))
        self.assertNotIn("secret", first.reason)
        self.assertEqual(streams.current, {})
        self.assertNotIn(first, self.leg.taps)
        second = streams.open(self.leg, "ws://app/y")  # the converse slot is still free: no 409
        self.assertIs(second.state, State.FAILED)
        self.assertTrue(self.leg.live)


def _code(error: Exception) -> str | None:
    """The error code the API answers C{error} with (its one table)."""
    answer = refusal(error)
    return None if answer is None else answer.code


class ValidationTests(SynchronousTestCase):
    def test_urls(self) -> None:
        for good in (
            "ws://app:8080/s/{call_id}/{role}", "wss://app.example/stream?token=x", "ws://[::1]:9/a%20b?q=1&r=(2)",
        ):
            self.assertEqual(check_url(good), good)
        for bad in (None, "", "http://app/", "ws:///nohost", "wss://user:pw@app/", 5, "ws://app/x#frag", "ws://app:99999/"):
            with self.assertRaises(BadStreamURL):
                check_url(bad)
        self.assertEqual(redact("wss://app.example/s?token=secret#x"), "wss://app.example/s")

    def test_urlsAreStrict(self) -> None:
        """Nothing that could end up mangled into the handshake's request line: whitespace, controls, non-ASCII."""
        for bad in (
            "ws://app/a b", "ws://app/x HTTP/1.1\r\nX-Evil: 1", "ws://app/x\n", " ws://app/x", "ws://app/\x00",
            "ws://app/\t", "ws://app/\x7f", "ws://app/é", "ws://app/{other}", "ws://app/%zz", "ws://app/50%",
            "ws://ap p/", "ftp://app/",
        ):
            with self.assertRaises(BadStreamURL) as raised:
                check_url(bad)
            self.assertEqual(_code(raised.exception), "bad_url", bad)

    def test_headers(self) -> None:
        self.assertEqual(parse_header("Authorization: Bearer abc"), ("Authorization", "Bearer abc"))
        self.assertEqual(parse_header("X-Tab: a\tb"), ("X-Tab", "a\tb"))
        for bad in ("no colon", "Bad Name: x", "Host: evil", "Sec-WebSocket-Key: x", "X-A: a\x00b", "X-A: a\x1bb"):
            with self.assertRaises(ValueError):
                parse_header(bad)
        for headers in (
            {"X-A": "line\r\nbreak"}, {"X-A\n": "x"}, {"X-A\r\nX-B": "x"}, {"": "x"}, {"X-A": "nul\x00"},
            {"X-A": "esc\x1b"}, {"X-A": "del\x7f"}, {"X-A": "a\nb"}, {"X-A": "x", "x-a": "y"},
            {"user-agent": "x"}, {"x-audiohangup-SIGNATURE": "t=1,sha256=00"}, {"X-Audiohangup-Timestamp": "1"},
        ):
            with self.assertRaises(BadStreamField) as raised:
                check_headers(headers)
            self.assertEqual(_code(raised.exception), "bad_headers", headers)
        self.assertEqual(check_headers({"X-A": "tab\tok é"}), {"X-A": "tab\tok é"})

    def test_configuredHeadersAreNotDoubled(self) -> None:
        """A header the configuration sets cannot come again from the API, in any case: refused, not merged."""
        streams = Streams(StreamConfig(headers=(("Authorization", "Bearer operator"),), secret="k"), Clock())
        for name in ("Authorization", "authorization", "AUTHORIZATION", "x-audiohangup-signature"):
            with self.assertRaises(BadStreamField) as raised:
                streams.check_headers({name: "Bearer caller"})
            self.assertEqual(_code(raised.exception), "bad_headers")
        self.assertEqual(streams.check_headers({"X-Caller": "c"}), {"X-Caller": "c"})
        sent = streams._handshakeHeaders("ws://app/x", {"X-Caller": "c"})
        self.assertEqual(
            sorted(name.lower() for name in sent),
            ["authorization", "x-audiohangup-signature", "x-audiohangup-timestamp", "x-caller"],
        )
