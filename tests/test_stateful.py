"""
Stateful property tests (Hypothesis) of the frame decoder and of the legs'
state machine.

Hypothesis drives random programs against the real objects and checks
invariants after every step:

- L{DecoderMachine}: random frames (any kind, payloads up to about 1000 bytes
  and the 16-bit maximum) fed to one L{FrameDecoder} in random chunks; the
  frames out equal the frames in, in order, and what stays buffered is always
  less than one frame.
- L{LegMachine}: several legs on C{StringTransport}s sharing one C{Clock}, one
  L{Pacer} and one L{Registry}, fed random bytes and frames (call ids from a
  small pool, so legs share sessions and replace each other) in random
  chunks, hung up, played to, timed out, refused over C{--max-legs} (or
  making the oldest connection without a UUID make way), paused
  by their transport (a slow consumer) and lost (clean, reset, aborted) in
  any order, as a real transport would deliver it: C{connectionLost} once,
  and always eventually after C{loseConnection} or C{abortConnection}. No
  exception may escape; each leg ends with one close reason, logged once;
  each wire holds whole frames, at most one C{00 00 00} and nothing after it;
  the registry, its sessions and the pacer hold exactly the live legs and
  connections; nothing is logged as a failure; and once every connection is
  gone, nothing is left, not even a timer.

Deterministic like the rest of C{tests/}: no sockets, no reactor. The
generated C{TestCase} classes are C{unittest.TestCase}s, so both pytest and
C{python -m twisted.trial tests.test_stateful} run them.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from audiohangup.audio import FORMATS, LegSettings
from audiohangup.flows import BUILTIN_FLOWS
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import CloseReason, HangupCause, LegState, Role
from audiohangup.registry import OnDuplicate, Registry
from audiohangup.wire import (
    HANGUP_FRAME,
    HEADER_SIZE,
    MAX_PAYLOAD,
    SAMPLE_RATES,
    Frame,
    FrameDecoder,
    Kind,
    encode_frame,
)

#: Modest on purpose: a few seconds per machine, every run, under both runners.
STATEFUL = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

#: A payload up to about 1000 bytes, or now and then one at the edges of the
#: 16-bit length field (built, not drawn byte by byte: drawing 64 KiB is slow).
payloads = st.one_of(
    st.binary(max_size=1000),
    st.binary(max_size=1000),
    st.builds(
        lambda size, fill: bytes([fill]) * size,
        st.sampled_from([255, 256, 0xFFFE, MAX_PAYLOAD]),
        st.integers(0, 255),
    ),
)

any_frames = st.lists(st.tuples(st.integers(0, 255), payloads), max_size=8)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """C{data} split at C{points} (taken modulo its length), empty chunks included."""
    offsets = sorted(p % (len(data) + 1) for p in points)
    chunks, last = [], 0
    for offset in offsets + [len(data)]:
        chunks.append(data[last:offset])
        last = offset
    return chunks


cut_points = st.lists(st.integers(0, 2**20), max_size=6)


# ---------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------


class DecoderMachine(RuleBasedStateMachine):
    """
    One decoder, a stream of frames written to it in arbitrary pieces, some of
    them spanning several rules. The model is the list of frames in and how
    many bytes of the stream have been fed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.decoder = FrameDecoder()
        self.frames_in: list[Frame] = []
        self.frame_ends: list[int] = []  # stream offset just past each frame
        self.stream = b""  # every byte written, fed or not
        self.fed = 0  # how many bytes of the stream went to feed()
        self.frames_out: list[Frame] = []

    def _write(self, frames: list[tuple[int, bytes]]) -> None:
        for kind, payload in frames:
            self.frames_in.append(Frame(kind, payload))
            self.stream += encode_frame(kind, payload)
            self.frame_ends.append(len(self.stream))

    def _feed(self, data: bytes) -> None:
        out = self.decoder.feed(data)
        assert isinstance(out, list)
        for frame in out:
            assert type(frame.kind) is int and 0 <= frame.kind <= 255
            assert type(frame.payload) is bytes
        self.frames_out.extend(out)
        self.fed += len(data)

    @rule(frames=any_frames, points=cut_points)
    def write_and_feed(self, frames: list[tuple[int, bytes]], points: list[int]) -> None:
        """Frames written and everything pending fed now, in random chunks."""
        self._write(frames)
        for chunk in cut(self.stream[self.fed :], points):
            self._feed(chunk)

    @rule(frames=any_frames)
    def write_only(self, frames: list[tuple[int, bytes]]) -> None:
        """Frames written but not fed yet: a later rule feeds them, in other pieces."""
        self._write(frames)

    @rule(size=st.one_of(st.integers(0, 8), st.integers(0, 2000)))
    def feed_some(self, size: int) -> None:
        """The next C{size} pending bytes (maybe none, maybe a frame's middle)."""
        self._feed(self.stream[self.fed : self.fed + size])

    @rule()
    def feed_bytewise(self) -> None:
        """Up to 64 pending bytes, one at a time."""
        for index in range(self.fed, min(self.fed + 64, len(self.stream))):
            self._feed(self.stream[index : index + 1])

    @invariant()
    def frames_out_equal_frames_in(self) -> None:
        complete = sum(1 for end in self.frame_ends if end <= self.fed)
        assert self.frames_out == self.frames_in[:complete]

    @invariant()
    def less_than_one_frame_buffered(self) -> None:
        complete = sum(1 for end in self.frame_ends if end <= self.fed)
        consumed = self.frame_ends[complete - 1] if complete else 0
        assert self.decoder.buffered == self.fed - consumed
        if complete < len(self.frame_ends):
            next_size = self.frame_ends[complete] - consumed
            assert self.decoder.buffered < next_size
        else:
            assert self.decoder.buffered == 0
        assert self.decoder.buffered < HEADER_SIZE + MAX_PAYLOAD


class TestDecoder(DecoderMachine.TestCase):
    # Hypothesis names the generated test runTest, which pytest runs but
    # trial's loader (methods named test*) does not: this name serves both.
    settings = STATEFUL

    def test_decoder(self) -> None:
        self.runTest()


# ---------------------------------------------------------------------------
# The legs
# ---------------------------------------------------------------------------

#: A small pool, so legs share sessions and replace each other.
CALL_IDS = [uuid.UUID(int=n * 0x1111_1111_1111_1111_1111_1111_1111_1111 + 1) for n in range(1, 4)]

_KNOWN = {int(k) for k in Kind}
unknown_kinds = st.integers(0, 255).filter(lambda k: k not in _KNOWN)


def _frame(kind: int, payload: bytes) -> bytes:
    return encode_frame(kind, payload)


#: The first call id twice as often: legs of one call meet and replace each other.
uuid_frames = st.builds(lambda call: _frame(Kind.UUID, call.bytes), st.sampled_from(CALL_IDS[:1] + CALL_IDS))

#: Frames a live leg takes and carries on after.
good_frames = st.one_of(
    # Audio of every kind, mostly of the usual sizes
    st.builds(
        _frame,
        st.sampled_from(sorted(SAMPLE_RATES)),
        st.one_of(
            st.sampled_from([160, 320, 640]).map(lambda n: b"\x01" * n),
            st.binary(min_size=1, max_size=700),
        ),
    ),
    st.builds(lambda n: _frame(Kind.SLIN, b"\x02" * n), st.sampled_from([160, 320])),
    st.builds(lambda n: _frame(Kind.SLIN16, b"\x03" * n), st.sampled_from([640])),
    # DTMF, one digit
    st.builds(lambda d: _frame(Kind.DTMF, d.encode()), st.sampled_from("0123456789*#ABCD")),
    # Unknown kinds, skipped by their length
    st.builds(_frame, unknown_kinds, st.binary(max_size=50)),
)

#: What ends or breaks a leg: the peer's hangup and error frames, frames out
#: of order or malformed, garbage.
bad_frames = st.one_of(
    st.builds(lambda p: _frame(Kind.HANGUP, p), st.one_of(st.just(b""), st.binary(max_size=3))),
    st.builds(lambda p: _frame(Kind.ERROR, p), st.binary(max_size=3)),
    uuid_frames,
    st.builds(lambda p: _frame(Kind.UUID, p), st.binary(max_size=20)),
    st.builds(lambda kind: _frame(kind, b""), st.sampled_from(sorted(SAMPLE_RATES))),
    st.builds(lambda p: _frame(Kind.DTMF, p), st.binary(max_size=3)),
    st.binary(min_size=1, max_size=2),
    st.binary(max_size=40),
)

#: What a peer sends in one go: good frames, maybe something bad, maybe more
#: after it (which must be discarded).
wire_data = st.builds(
    lambda before, bad, after: b"".join(before) + b"".join(bad) + b"".join(after),
    st.lists(good_frames, max_size=5),
    st.lists(bad_frames, max_size=1),
    st.lists(good_frames, max_size=2),
)

leg_settings = st.builds(
    LegSettings,
    close_timeout=st.sampled_from([0.5, 2.0]),
    uuid_timeout=st.sampled_from([1.0, 5.0]),
    audio=st.sampled_from([FORMATS["slin"], FORMATS["slin16"], FORMATS["ulaw"]]),
    max_queue_ms=st.sampled_from([40, 1000]),
    idle_timeout=st.sampled_from([0.0, 3.0]),
    max_duration=st.sampled_from([0.0, 8.0]),
    playout_timeout=st.sampled_from([0.5, 10.0]),
    max_legs=st.sampled_from([2000, 4]),
)


class Wire(StringTransport):
    """
    A C{StringTransport} that keeps each C{write} apart and notes what was
    written once the connection was being closed or was gone.
    """

    def __init__(self, port: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.writes: list[bytes] = []
        self.lost = False
        self.written_after_close: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.lost:
            self.written_after_close.append(data)
        self.writes.append(data)
        super().write(data)


class Conn:
    """One connection of the test: the leg, its wire and what the test knows of it."""

    def __init__(self, leg: AudioSocketProtocol, wire: Wire) -> None:
        self.leg = leg
        self.wire = wire
        self.lost = False
        self.started = False  # its UUID arrived (it had a call id)
        self.close_reason: CloseReason | None = None
        self.pending = b""  # bytes sent by the peer, not delivered yet
        self.refused = False  # over --max-legs when it connected
        self.crowded = False  # still without a UUID when a newcomer at --max-legs took its place
        self.duplicate = False  # its UUID named a live leg's key, and duplicates are refused
        self.stopped_reading = False  # the transport paused it (a slow consumer)

    def __repr__(self) -> str:
        return f"<Conn {self.leg.peer} {self.leg.role} {self.leg.call_id} {self.leg.state}>"


class LegMachine(RuleBasedStateMachine):
    """
    Legs, the registry, the sessions, the pacer and the timers, all on one
    C{Clock}. The model keeps which connections are open and which leg the
    registry should hold for each (call id, role): the latest to start, until
    it is lost.
    """

    MAX_CONNECTIONS = 8

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[dict[str, Any]] = []
        self.ended: Counter[str] = Counter()
        globalLogPublisher.addObserver(self._observe)
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.conns: list[Conn] = []
        self.expected: dict[tuple[str, Role], Conn] = {}
        self.registry: Registry | None = None
        self.settings = LegSettings()

    def _observe(self, event: dict[str, Any]) -> None:
        # log_failure: twisted.logger's failure(); failure and isError: the
        # legacy log.err(), which Twisted itself still uses.
        if "log_failure" in event or (event.get("isError") and "failure" in event):
            self.failures.append(event)
        if "leg ended" in event.get("log_format", ""):
            self.ended[event.get("peer", "?")] += 1

    @initialize(
        flow=st.sampled_from(sorted(BUILTIN_FLOWS)), end_with_leg=st.booleans(), settings=leg_settings,
        on_duplicate=st.sampled_from(["refuse", "replace"]),
    )
    def setup(self, flow: str, end_with_leg: bool, settings: LegSettings, on_duplicate: OnDuplicate) -> None:
        self.registry = Registry(BUILTIN_FLOWS[flow], end_with_leg=end_with_leg, on_duplicate=on_duplicate)
        self.settings = settings

    # Helpers

    def _open(self) -> list[Conn]:
        return [conn for conn in self.conns if not conn.lost]

    def _closing(self) -> list[Conn]:
        """Open connections whose transport was told to close: Twisted owes them connectionLost."""
        return [conn for conn in self._open() if conn.wire.disconnecting]

    def _track_starts(self) -> None:
        """
        Note the legs whose UUID arrived in the last step: each is its key's
        leg now, unless duplicates are refused and that key's leg is live.
        """
        assert self.registry is not None
        for conn in self.conns:
            if not conn.started and conn.leg.call_id is not None:
                conn.started = True
                key = (conn.leg.call_id, conn.leg.role)
                holder = self.expected.get(key)
                refused = (
                    self.registry.on_duplicate == "refuse" and holder is not None
                    and holder.leg.state is LegState.LIVE
                )
                assert (conn.leg.hangup_cause is HangupCause.DUPLICATE) == refused, (conn, holder)
                if refused:
                    conn.duplicate = True
                    assert conn.leg.state is LegState.CLOSING and conn.wire.value() == HANGUP_FRAME, conn
                elif not conn.lost:
                    self.expected[key] = conn

    def _lose(self, conn: Conn, failure: Failure) -> None:
        assert not conn.lost, "connectionLost twice is not what a transport does"
        key = conn.leg.key
        registered = key is not None and self.expected.get(key) is conn
        conn.lost = conn.wire.lost = True
        conn.wire.connected = False
        conn.leg.connectionLost(failure)
        conn.close_reason = conn.leg.close_reason
        assert conn.close_reason is not None
        assert conn.close_reason is not CloseReason.INTERNAL_ERROR
        if conn.refused:
            assert conn.close_reason is CloseReason.OVER_CAPACITY, conn.close_reason
        elif conn.crowded:
            assert conn.close_reason is CloseReason.TOO_MANY_PENDING, conn.close_reason
        elif conn.stopped_reading:
            # A decision wins over our hangup: the peer did not even take that.
            assert conn.close_reason is CloseReason.SLOW_CONSUMER, conn.close_reason
        elif conn.duplicate:
            assert conn.close_reason is CloseReason.DUPLICATE, conn.close_reason
        elif HANGUP_FRAME in conn.wire.writes:
            assert conn.close_reason in (
                CloseReason.HANGUP_CLEAN,
                CloseReason.HANGUP_RESET,
                CloseReason.HANGUP_TIMEOUT,
            ), conn.close_reason
        if registered:
            del self.expected[key]
            if self.registry.end_with_leg:
                # A session ends with its first leg: the others are hung up.
                for other in self.registry.call(key[0]):
                    assert other.state is LegState.CLOSING, (other, other.state)

    # Rules

    @precondition(lambda self: len(self.conns) < self.MAX_CONNECTIONS)
    @rule(role=st.sampled_from(Role), first=st.one_of(st.none(), uuid_frames, uuid_frames), points=cut_points)
    def connect(self, role: Role, first: bytes | None, points: list[int]) -> None:
        """A new connection; mostly its UUID follows at once (in random chunks)."""
        assert self.registry is not None
        counted = [c for c in self._open() if not c.refused]
        # At --max-legs the oldest connection still without a UUID makes way (of the source
        # with the most: here all share one); without one, the newcomer is refused.
        pending = [c for c in counted if c.leg.state is LegState.AWAITING_UUID]
        full = len(counted) >= self.settings.max_legs
        leg = AudioSocketProtocol(role, self.registry, self.settings, self.clock, self.pacer)
        wire = Wire(40000 + len(self.conns))
        leg.makeConnection(wire)
        conn = Conn(leg, wire)
        conn.refused = full and not pending
        if full and pending:
            pending[0].crowded = True
            assert pending[0].leg.state is LegState.CLOSING and pending[0].wire.disconnecting, pending[0]
        self.conns.append(conn)
        if conn.refused:
            # Refused at once: nothing written, closed, not counted.
            assert wire.disconnecting and wire.value() == b"", conn
            assert leg not in self.registry.connections()
            assert leg.state is LegState.CLOSING
        else:
            assert leg in self.registry.connections()
        if first is not None:
            self._deliver(conn, first, points, 0)

    def _deliver(self, conn: Conn, payload: bytes, points: list[int], hold: int) -> None:
        """
        The peer's bytes after what it sent before, in random chunks; the last
        C{hold} bytes stay in flight for a later step (a frame split across
        steps, with timers and other legs in between).
        """
        stream = conn.pending + payload
        hold = min(hold, len(stream))
        stream, conn.pending = stream[: len(stream) - hold], stream[len(stream) - hold :]
        for chunk in cut(stream, points):
            conn.leg.dataReceived(chunk)
        self._track_starts()

    @precondition(lambda self: self._open())
    @rule(data=st.data(), payload=wire_data, points=cut_points, hold=st.sampled_from([0, 0, 0, 1, 2, 5, 100]))
    def receive(self, data: st.DataObject, payload: bytes, points: list[int], hold: int) -> None:
        """Frames (good, malformed, out of order) in random chunks, on an open connection."""
        conn = data.draw(st.sampled_from(self._open()), label="conn")
        self._deliver(conn, payload, points, hold)

    @precondition(lambda self: any(conn.leg.call_id is None for conn in self._open()))
    @rule(data=st.data(), uuid=uuid_frames, then=wire_data, points=cut_points, hold=st.sampled_from([0, 0, 3, 19]))
    def start(self, data: st.DataObject, uuid: bytes, then: bytes, points: list[int], hold: int) -> None:
        """A connection without a call id yet gets its UUID (and maybe more), in random chunks."""
        conn = data.draw(st.sampled_from([c for c in self._open() if c.leg.call_id is None]), label="conn")
        self._deliver(conn, uuid + then, points, hold)

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), cause=st.sampled_from(HangupCause))
    def hangup(self, data: st.DataObject, cause: HangupCause) -> None:
        """Any leg, even one already closing or gone (a flow or the API may hold it)."""
        conn = data.draw(st.sampled_from(self.conns), label="conn")
        gone = conn.leg.hangup(cause)
        if conn.lost:
            assert gone.called
        self._track_starts()

    @precondition(lambda self: self._open())
    @rule(data=st.data(), milliseconds=st.integers(1, 1500), after_playout=st.booleans())
    def play(self, data: st.DataObject, milliseconds: int, after_playout: bool) -> None:
        """Queue audio on a leg, as /play does, and maybe hang up once it has played."""
        conn = data.draw(st.sampled_from(self._open()), label="conn")
        fmt = conn.leg.format
        conn.leg.play(b"\x07" * max(fmt.sample_bytes, round(fmt.rate * milliseconds / 1000) * fmt.sample_bytes))
        if after_playout:
            conn.leg.hangupAfterPlayout(HangupCause.API)

    @rule(seconds=st.sampled_from([0.02, 0.02, 1.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self._open())
    @rule(data=st.data(), failure=st.sampled_from(["done", "lost", "aborted"]))
    def peer_goes(self, data: st.DataObject, failure: str) -> None:
        """The peer closes or resets whenever it likes, whatever our state."""
        conn = data.draw(st.sampled_from(self._open()), label="conn")
        self._lose(
            conn,
            {"done": Failure(ConnectionDone()), "lost": Failure(ConnectionLost()), "aborted": Failure(ConnectionAborted())}[failure],
        )

    def _writers(self) -> list[Conn]:
        """Open connections we wrote to, whose send buffer could fill."""
        return [conn for conn in self._open() if conn.wire.producer is not None and conn.wire.writes]

    @precondition(lambda self: self._writers())
    @rule(data=st.data())
    def peer_stops_reading(self, data: st.DataObject) -> None:
        """
        Our send buffer passed its bound: the transport pauses its producer,
        the leg (maybe more than once, at any point of its life).
        """
        conn = data.draw(st.sampled_from(self._writers()), label="conn")
        conn.stopped_reading = True
        conn.wire.producer.pauseProducing()
        assert conn.wire.disconnected, "a slow consumer is aborted"

    @precondition(lambda self: self._closing())
    @rule(data=st.data(), reset=st.booleans())
    def transport_closes(self, data: st.DataObject, reset: bool) -> None:
        """
        What Twisted owes a transport we closed: after abortConnection,
        ConnectionAborted; after loseConnection, ConnectionDone (or a reset if
        the peer resets first).
        """
        conn = data.draw(st.sampled_from(self._closing()), label="conn")
        if conn.wire.disconnected:
            failure = Failure(ConnectionAborted())
        elif reset:
            failure = Failure(ConnectionLost())
        else:
            failure = Failure(ConnectionDone())
        self._lose(conn, failure)

    # Invariants

    @invariant()
    def no_failure_logged(self) -> None:
        assert self.failures == [], [
            (event.get("log_format"), (event.get("log_failure") or event["failure"]).getTraceback())
            for event in self.failures
        ]

    @invariant()
    def one_close_reason_per_leg(self) -> None:
        for conn in self.conns:
            if conn.lost:
                assert conn.leg.close_reason is conn.close_reason
                assert conn.leg.state is LegState.CLOSED
                assert self.ended[conn.leg.peer] == 1, (conn, self.ended[conn.leg.peer])
            else:
                assert conn.leg.close_reason is None, conn
                assert conn.leg.state is not LegState.CLOSED
                assert self.ended[conn.leg.peer] == 0, conn

    @invariant()
    def wire_is_whole_frames_ending_with_one_hangup(self) -> None:
        for conn in self.conns:
            wire = conn.wire
            assert wire.written_after_close == [], (conn, wire.written_after_close)
            decoder = FrameDecoder()
            frames = decoder.feed(wire.value())
            assert decoder.buffered == 0
            # One write, one whole frame (Asterisk drops split frames).
            assert len(frames) == len(wire.writes)
            hangups = [i for i, frame in enumerate(frames) if frame.kind == Kind.HANGUP]
            assert len(hangups) <= 1, conn
            if hangups:
                assert hangups[0] == len(frames) - 1, f"{conn} wrote after 00 00 00"
                assert frames[-1].payload == b""
                assert conn.leg.hangup_cause is not None
            for frame in frames[: len(frames) - len(hangups)]:
                # Only audio of the leg's own kind goes out: never DTMF, an error, a UUID.
                assert frame.kind == conn.leg.format.kind, (conn, frame.kind)
            if conn.leg.state in (LegState.AWAITING_UUID, LegState.LIVE):
                assert not hangups

    @invariant()
    def registry_matches_live_connections(self) -> None:
        registry = self.registry
        if registry is None:
            return
        listed = set()
        calls = registry.calls()
        for call_id, legs in calls.items():
            assert legs, f"empty session {call_id} kept"
            session = registry.session(call_id)
            assert session is not None and session.call_id == call_id
            assert session.ordered() == legs
            for leg in legs:
                assert leg.close_reason is None and leg.state is not LegState.CLOSED, leg
                assert leg.call_id == call_id
                assert leg.session is session
                assert session.legs[leg.role] is leg
                assert registry.get(call_id, leg.role) is leg
                listed.add(leg)
        assert listed == {conn.leg for conn in self.expected.values()}
        for (call_id, role), conn in self.expected.items():
            assert registry.get(call_id, role) is conn.leg
        assert len(registry) == len(listed)
        assert set(registry) == listed
        counted = {conn.leg for conn in self._open() if not conn.refused}
        assert set(registry.connections()) == counted
        assert len(registry.connections()) == registry.connection_count == len(counted)
        waiting = [conn.leg for conn in self._open() if not conn.refused and conn.leg.state is LegState.AWAITING_UUID]
        assert len(registry.pending) == len(waiting)
        assert registry.pending.oldestOfMost() is (waiting[0] if waiting else None)  # one source
        # Every leg that is LIVE is its key's registered leg.
        for conn in self._open():
            if conn.leg.state is LegState.LIVE:
                assert conn.leg in listed, conn

    @invariant()
    def pacer_holds_only_live_legs(self) -> None:
        paced = set(self.pacer._legs)
        assert paced == {conn.leg for conn in self.conns if conn.leg.state is LegState.LIVE}
        assert self.pacer._loop.running == bool(paced)

    @invariant()
    def no_timers_without_connections(self) -> None:
        if not self._open():
            assert self.clock.getDelayedCalls() == []

    def teardown(self) -> None:
        """Deliver what Twisted still owes, then nothing may be left behind."""
        try:
            for _ in range(10):
                if not self._closing():
                    self.clock.advance(max(self.settings.close_timeout, 0.02) + 0.01)
                for conn in self._closing():
                    self._lose(conn, Failure(ConnectionAborted() if conn.wire.disconnected else ConnectionDone()))
            # The peers still connected now go away too.
            for conn in self._open():
                self._lose(conn, Failure(ConnectionDone()))
            if self.registry is not None:
                self.registry_matches_live_connections()
                assert len(self.registry) == 0 and self.registry.calls() == {}
                assert self.registry.connections() == []
            self.one_close_reason_per_leg()
            self.wire_is_whole_frames_ending_with_one_hangup()
            assert len(self.pacer) == 0
            assert self.clock.getDelayedCalls() == []
            self.no_failure_logged()
        finally:
            globalLogPublisher.removeObserver(self._observe)


class TestLegs(LegMachine.TestCase):
    settings = STATEFUL

    def test_legs(self) -> None:
        self.runTest()
