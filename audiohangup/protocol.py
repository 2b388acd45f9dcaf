# -*- test-case-name: tests.test_protocol -*-
"""
The Twisted side of one AudioSocket leg: its admission, frames in, frames out
(the bridge's direct write, the pacer's tick), and what the server's parts
attach to it. How it ends (its hangup and bounded teardown) is
L{audiohangup.teardown}; which frame goes out in each 20 ms slot is
L{audiohangup.timeline}.
"""

from __future__ import annotations

import errno
import math
import socket
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.attachments import LegAttachments
from audiohangup.audio import FRAME_SECONDS, FrameQueue, LegSettings, Playout
from audiohangup.interfaces import ILeg, ILegTap, IMediaStream, IPacedLeg, IServerLeg
from audiohangup.logs import LogLimit, describe_address
from audiohangup.pacer import Pacer
from audiohangup.reasons import AWAITING_UUID, CLOSED, CLOSING, LIVE, CloseReason, HangupCause, Loss, Role
from audiohangup.registry import LegKey, Registry
from audiohangup.relay import Relay, fast_paths
from audiohangup.session import Session
from audiohangup.sources import source_of
from audiohangup.teardown import LegTeardown, socket_of
from audiohangup.timeline import BRIDGE_HOLD, SlotPlayer, Timeline
from audiohangup.wire import (
    HEADER,
    HEADER_SIZE,
    SAMPLE_RATES,
    Frame,
    FrameDecoder,
    Kind,
    describe_error_code,
)

#: Digits kept per leg: enough for any PIN or menu path, bounded for a hostile peer.
MAX_DTMF_DIGITS = 64

#: DTMF digits logged at info per leg and second. A person keys a few a
#: second, and Q.24 tones (40 ms at least, 40 ms apart) come at most 12.5 a
#: second; a flood beyond this is counted (audiohangup_dtmf_total), not
#: logged, so it cannot write more log than it sends.
DTMF_LOG_PER_SECOND = 10


@implementer(IPacedLeg, IPushProducer, IHalfCloseableProtocol)
class AudioSocketProtocol(LegTeardown, LegAttachments, SlotPlayer, Protocol):
    """
    One AudioSocket connection. It becomes a leg, keyed by (call id, role),
    once its UUID frame arrives; before that it is only a connection.

    From the UUID on, the shared L{Pacer} asks it for one frame per 20 ms:
    queued audio (a prompt, an echo) first, else nothing if audio was just
    forwarded to it (a bridge), else silence.
    """

    log = Logger()

    # Slots: the relay and the pacer read a dozen of a leg's attributes for
    # every frame and every tick, across hundreds of legs. In slots they sit
    # in a few cache lines of the object, not in a dict of over 40 keys.
    # The hot ones come first; what Twisted sets (transport, factory,
    # connected) stays in the instance dict, as do a test's patches.
    # (LegTeardown's slots, its state, come first.)
    __slots__ = (  # noqa: RUF023 (in order of heat, not of name)
        "route", "bytes_in", "frames_in", "last_frame_at", "taps", "_decoder",
        "_audioFrameSize", "_audioHeader", "reactor", "queue", "feed", "forwarded_at", "written_in", "held", "idle_after",
        "frames_out", "bytes_out", "heard", "_socket", "_buffered", "_tcp",
        "role", "registry", "settings", "format", "pacer", "relay", "call_id", "session", "peer",
        "connected_at", "dtmf", "dtmf_count", "_dtmfLog", "recording", "streams",
        "_wrong_kind_logged", "timeline", "last_in", "last_out",
    )

    def __init__(
        self,
        role: Role,
        registry: Registry,
        settings: LegSettings,
        reactor: IReactorTime,
        pacer: Pacer,
        relay: Relay | None = None,
    ) -> None:
        self.role = role
        self.registry = registry
        self.settings = settings
        self.format = settings.audio
        self.reactor = reactor
        self.pacer = pacer
        #: Reads this leg's socket in its pass over every leg, when the leg is plain TCP.
        self.relay = relay
        self.state = AWAITING_UUID
        self.call_id: str | None = None
        self.session: Session | None = None
        self.peer = "-"
        self.connected_at = 0.0
        self.ended_at: float | None = None
        self.last_frame_at = 0.0
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dtmf = ""
        self.dtmf_count = 0
        #: The digits logged in the current second; made at the first digit (most legs have none).
        self._dtmfLog: LogLimit | None = None
        self.queue = FrameQueue(settings.max_queue_frames)
        #: What a converse media stream sends the leg: paced after queued prompts.
        self.feed: Playout | None = None
        self.taps: list[ILegTap] = []
        self.heard: list[ILegTap] = []
        self.recording: str | None = None
        self.streams: list[IMediaStream] = []
        #: The last audio frame received (encoded, or parsed) and sent: what the level meters sample.
        self.last_in: bytes | Frame | None = None
        self.last_out: bytes | None = None
        #: The leg the built-in bridge forwards this one's audio to, byte for byte (see dataReceived).
        self.route: ILeg | None = None
        fmt = self.format
        self._audioHeader = HEADER.pack(fmt.kind, fmt.frame_bytes)
        self._audioFrameSize = HEADER_SIZE + fmt.frame_bytes
        self.hangup_cause: HangupCause | None = None
        self.hangup_at: float | None = None
        self.close_reason: CloseReason | None = None
        self._decided: CloseReason | None = None
        self._detail = ""
        self._decoder = FrameDecoder()
        self._timers: dict[str, IDelayedCall] = {}
        self._waiting: list[Deferred[CloseReason]] = []
        #: When audio was last bridged to this leg; the pacer sends no silence soon after.
        self.forwarded_at = -math.inf
        #: The pacer's slot this leg last had a frame written in: one frame a slot, whatever feeds it.
        self.written_in = -1
        #: Bridged frames whose slot had a frame already, for the next ticks.
        self.held: deque[bytes] = deque(maxlen=BRIDGE_HOLD)
        #: Which frame goes out in each slot, and what a stall made late.
        self.timeline = Timeline(self.format)
        #: Seconds without a frame from the peer before the idle hangup (inf: never).
        self.idle_after = settings.idle_timeout or math.inf
        self._after_playout: HangupCause | None = None
        self._wrong_kind_logged = False
        #: The plain TCP connection under this leg, if it is one, and its
        #: socket, which _write sends to while the transport buffers nothing.
        self._tcp: tcp.Connection | None = None
        self._socket: socket.socket | None = None
        #: Bytes of ours went to the transport's buffer and may still be there.
        self._buffered = False
        self._peerReset = False  # a reset the transport's reason may not show
        self._peerEnd: Loss | None = None  # how the peer ended its side, seen at its end of stream

    def logPrefix(self) -> str:
        return f"audiosocket-{self.role}"

    @property
    def key(self) -> LegKey | None:
        return None if self.call_id is None else (self.call_id, self.role)

    @property
    def live(self) -> bool:
        return self.state is LIVE

    def _fields(self) -> dict[str, Any]:
        return {"call_id": self.call_id or "-", "role": self.role, "peer": self.peer}

    # Connection events

    def connectionMade(self) -> None:
        self.connected_at = self.last_frame_at = self.reactor.seconds()
        connection = self.connection
        address = connection.getPeer()
        self.peer = describe_address(address)
        settings = self.settings
        if self.registry.refusing is not None:
            self._closeFor(CloseReason.DRAINING, self.registry.refusing)
            return
        refused = self.registry.admit(self, source_of(address), settings.max_legs, settings.max_pending_per_source, self._crowd)
        if refused is not None:
            self._closeFor(CloseReason.OVER_CAPACITY, refused)
            return
        if ITCPTransport.providedBy(connection):
            # Asterisk fails a frame whose pieces arrive over 5 ms apart.
            connection.setTcpNoDelay(True)
        # A plain TCP transport (not TLS, not a test double) can take a frame
        # straight away when its buffer is empty; see _write. Unless the fast
        # paths are off (AUDIOHANGUP_FAST_PATHS=off): then Twisted writes and reads.
        if fast_paths() and isinstance(connection, tcp.Connection) and hasattr(connection, "_tempDataBuffer"):
            self._tcp = connection
            self._socket = connection.socket
            if self.relay is not None:
                self.relay.adopt(self, connection)
        self._watchBackPressure()
        self._setTimer("uuid", self.settings.uuid_timeout, self._uuidTimedOut)

    def _crowd(self, oldest: IServerLeg, key: str, detail: str) -> None:
        """Close C{oldest} (pending) for this newcomer; logged once a minute per source or for --max-legs."""
        waited = self.connected_at - oldest.connected_at
        oldest.crowdOut(f"{detail}; it waited {waited:.3f} s")
        if self.registry.pending.logNow(key, self.connected_at):
            self.log.warn(
                "{role}: {detail}: the oldest connection without a UUID is closed for each new one "
                "(reason too_many_pending, counted in audiohangup_connections_without_leg_total; logged "
                "once a minute per source)",
                detail=detail, role=self.role,
            )

    def bytesWaiting(self) -> bool:
        handle = socket_of(self.connection)
        if not isinstance(handle, socket.socket):
            return False  # TLS (its bytes say nothing yet) or a test transport
        try:
            return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waits (EAGAIN), or an error the next read will find
            return False

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        route = self.route
        if (
            route is not None and self.state is LIVE and len(data) == self._audioFrameSize
            and data.startswith(self._audioHeader) and not self.taps and not self._decoder.pending
        ):
            # The common case of a bridged call: one whole frame of this leg's
            # own audio, bridged to the route by the built-in flow: the same
            # bytes go out, with no parse, no frame object and no flow call.
            self.frames_in += 1
            self.last_frame_at = self.reactor.seconds()
            self.last_in = data  # a reference for the level meters (audiohangup.levels), no copy
            route.forwardBytes(data)
            return
        if self.state is CLOSING or self.state is CLOSED:
            return  # after a hangup or a close decision: read and discard
        frames = self._decoder.feed(data)
        if not frames:
            return
        self.last_frame_at = self.reactor.seconds()
        for frame in frames:
            if self.state is LIVE:
                self.frames_in += 1
                self._frameReceived(frame)
            elif self.state is AWAITING_UUID:
                self.frames_in += 1
                self._uuidFrameReceived(frame.kind, frame.payload)
            else:
                return  # the rest of the chunk follows a close decision

    # Frames in

    def _uuidFrameReceived(self, kind: int, payload: bytes) -> None:
        if kind != Kind.UUID:
            self._closeFor(CloseReason.PROTOCOL_ERROR, f"first frame is kind 0x{kind:02x}, not a UUID")
        elif len(payload) != 16:
            self._closeFor(CloseReason.PROTOCOL_ERROR, f"UUID payload of {len(payload)} bytes, not 16")
        else:
            self._start(str(uuid.UUID(bytes=payload)))

    def _frameReceived(self, frame: Frame) -> None:
        kind = frame.kind
        if kind in SAMPLE_RATES:
            if not frame.payload:
                self._closeFor(CloseReason.PROTOCOL_ERROR, "audio frame of length 0")
                return
            if kind != self.format.kind and not self._wrong_kind_logged:
                self._wrong_kind_logged = True
                self.log.warn(
                    "{call_id} {role} sends audio of kind 0x{kind:02x}, not the 0x{expected:02x} "
                    "of --audio {audio}; check the dialplan's codec",
                    kind=kind, expected=self.format.kind, audio=self.format.name, **self._fields(),
                )
            self.last_in = frame
            assert self.session is not None
            self.session.audioReceived(self, frame)
            if self.taps:
                self._tell("legAudio", lambda tap: tap.legAudio(frame))
        elif kind == Kind.DTMF:
            if len(frame.payload) != 1:
                self._closeFor(
                    CloseReason.PROTOCOL_ERROR, f"DTMF payload of {len(frame.payload)} bytes, not 1"
                )
            else:
                self._dtmfReceived(frame.payload.decode("latin-1"))
        elif kind == Kind.HANGUP:
            self._closeFor(CloseReason.PEER_HANGUP, "")
        elif kind == Kind.ERROR:
            self._closeFor(CloseReason.PEER_ERROR, f"error code {describe_error_code(frame.payload)}")
        elif kind == Kind.UUID:
            self._closeFor(CloseReason.PROTOCOL_ERROR, "second UUID frame")
        else:
            self.log.debug(
                "{call_id} {role} skipped a frame of unknown kind 0x{kind:02x} ({length} bytes)",
                kind=kind, length=len(frame.payload), **self._fields(),
            )

    def _dtmfReceived(self, digit: str) -> None:
        self.dtmf = (self.dtmf + digit)[-MAX_DTMF_DIGITS:]
        self.dtmf_count += 1
        self._logDtmf(digit)
        assert self.session is not None
        self.session.dtmfReceived(self, digit)
        if self.taps:
            self._tell("legDtmf", lambda tap: tap.legDtmf(digit))

    def _logDtmf(self, digit: str) -> None:
        """Each digit at info, up to L{DTMF_LOG_PER_SECOND} a second; then one warning for the rest of it."""
        if self._dtmfLog is None:
            self._dtmfLog = LogLimit(1.0, burst=DTMF_LOG_PER_SECOND)
        logged = self._dtmfLog.count("", self.reactor.seconds())
        if logged <= DTMF_LOG_PER_SECOND:
            self.log.info("{call_id} {role} DTMF {digit!r}", digit=digit, **self._fields())
        elif logged == DTMF_LOG_PER_SECOND + 1:
            self.log.warn(
                "{call_id} {role} sends over {limit} DTMF digits a second: more this second are "
                "counted (audiohangup_dtmf_total), not logged",
                limit=DTMF_LOG_PER_SECOND, **self._fields(),
            )

    def _tell(self, event: str, call: Callable[[ILegTap], object]) -> None:
        """C{call} on every tap (typed, which mypy checks); one tap's bug is logged and reaches neither the leg nor the others."""
        for tap in list(self.taps):
            try:
                call(tap)
            except Exception:
                self.log.failure(
                    "{call_id} {role} {tap} failed in {event}", tap=type(tap).__name__, event=event, **self._fields()
                )

    def _start(self, call_id: str) -> None:
        self._cancelTimer("uuid")
        self.registry.pending.discard(self)
        self.call_id = call_id
        holder = self.registry.holder(call_id, self.role)
        if holder is not None:
            # Never a leg: no session, no pacer, nothing of the call written to it.
            self._decided = CloseReason.DUPLICATE
            self._detail = f"the live leg is from {holder.peer}"
            self._sendHangup(HangupCause.DUPLICATE)
            return
        self.state = LIVE
        self.log.info("{call_id} {role} leg started from {peer}", **self._fields())
        self.pacer.add(self)
        if self.settings.max_duration:
            self._setTimer("max_duration", self.settings.max_duration, self.hangup, HangupCause.MAX_DURATION)
        self.session, replaced = self.registry.register(self)
        if replaced is not None:
            self.log.info(
                "{call_id} {role} leg from {old_peer} is replaced by the one from {peer}",
                old_peer=replaced.peer, **self._fields(),
            )
            replaced.hangup(HangupCause.REPLACED)

    # Frames out: nothing is ever written after 00 00 00.

    def send(self, data: bytes) -> bool:
        """Write one whole encoded frame now, unless the leg is not live."""
        if self.state is not LIVE:
            return False
        self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        self.frames_out += 1
        self.bytes_out += len(data)
        self.last_out = data
        if self.heard:
            for tap in self.heard:
                tap.legHeard(data)
        sock = self._socket
        if sock is not None and self._buffered:
            # Only this method writes to the transport, so its buffer can hold
            # bytes only after we gave it some: look at it only then.
            connection = self._tcp
            assert connection is not None
            self._buffered = bool(connection.dataBuffer or connection._tempDataBuffer)
        if sock is not None and not self._buffered:
            # Nothing is queued ahead of this frame: send it now rather than at
            # the reactor's next write pass, which comes only after every other
            # socket that was readable has been read (a whole burst of legs),
            # and costs two epoll_ctl calls per frame. What the socket does not
            # take, Twisted buffers as usual, in order.
            # The socket's own send: what writeSomeData does, without its
            # memoryview and EINTR wrapper, on the one path every frame takes.
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    # The send found the peer gone (a reset). That error is now
                    # spent: the read that follows may see a plain end of
                    # stream, so remember it for connectionLost.
                    self._peerReset = True
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._buffered = True
        self.connection.write(data)

    def forward(self, frame: Frame) -> None:
        """
        Bridge a frame from another leg: written at once, one write, same
        bytes. While a prompt or an app speaks to the leg (and for
        L{audiohangup.timeline.SPOKEN_TICKS} after), its slots are the pacer's: a bridged frame
        in a slot that had its frame waits for the next tick. Queued audio
        (a prompt) has the floor, and so has an app's speech under
        C{--stream-audio floor}: the bridged frame is dropped; under C{mix}
        it waits to be summed with the app's.
        """
        self.forwardBytes(frame.encode())

    def bridgeTo(self, other: ILeg | None) -> None:
        """Forward this leg's own whole frames to C{other} as they come (see L{dataReceived}); None: through the flow."""
        self.route = other

    def queueFrames(self, frames: list[bytes]) -> int:
        """Queue encoded frames for the pacer; return how many old ones were dropped."""
        if self.state is not LIVE:
            return 0
        dropped = self.queue.push(frames)
        if dropped:
            self.log.debug("{call_id} {role} queue full: dropped {dropped} frames", dropped=dropped, **self._fields())
        return dropped

    def play(self, audio: bytes) -> int:
        """Queue raw audio in the leg's format, cut into 20 ms frames."""
        return self.queueFrames(self.format.frames(audio))

    @property
    def queued_ms(self) -> int:
        return round(len(self.queue) * FRAME_SECONDS * 1000)

    def paceTick(self, now: float, bridged_since: float, missed: int = 0) -> None:
        """
        The pacer's 20 ms tick: the idle check, then at most one frame, as
        the leg's L{Timeline} picks it; silence only if nothing was bridged
        here since C{bridged_since}. After C{missed} slots without a tick,
        the audio due in them is dropped, not played late.
        """
        if self.state is not LIVE:
            return
        if now - self.last_frame_at >= self.idle_after:
            self.hangup(HangupCause.IDLE_TIMEOUT)
            return
        self._playSlot(missed, silence=self.forwarded_at < bridged_since)

class AudioSocketFactory(Factory):
    """Builds the legs of one role; one factory per listening endpoint."""

    noisy = False

    def __init__(
        self,
        role: Role,
        registry: Registry,
        settings: LegSettings,
        reactor: IReactorTime,
        pacer: Pacer,
        relay: Relay | None = None,
    ) -> None:
        self.role = role
        self.registry = registry
        self.settings = settings
        self.reactor = reactor
        self.pacer = pacer
        self.relay = relay

    def buildProtocol(self, addr: IAddress | None) -> AudioSocketProtocol:
        protocol = AudioSocketProtocol(self.role, self.registry, self.settings, self.reactor, self.pacer, self.relay)
        protocol.factory = self
        return protocol

    def logPrefix(self) -> str:
        return f"audiosocket-{self.role}"
