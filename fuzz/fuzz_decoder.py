"""
Coverage-guided fuzz target (atheris) for the AudioSocket frame decoder and
for one leg fed the same bytes.

Each input is read as::

    byte 0        flags: bit 0 put a valid UUID frame (the resident leg's
                  call) before the stream; bit 1 hang the leg up at the end;
                  bit 2 advance the clock between chunks; bits 3-4 how the
                  connection ends (clean, reset, aborted, or after the close
                  timer); bits 5-7 how many cut points follow (0-7)
    byte 1        more flags: bit 0 the transport pauses the leg (its peer
                  stopped reading: slow consumer) after chunk number bits
                  1-3; bit 4 --max-legs 1, so the visitor is refused
    2 bytes each  the cut points, big endian, modulo the stream's length
    the rest      the stream

and checked two ways:

1. C{FrameDecoder}, fed the stream in the chunks the cut points make, and
   again one byte at a time, gives exactly what a plain reference parser
   gives for the whole stream, and holds back exactly the unparsed tail
   (always less than one frame).
2. A visitor leg (C{AudioSocketProtocol} on a C{StringTransport}, C{Clock},
   C{Pacer}, C{Registry}) fed the same chunks, with a resident leg of the same
   call live beside it, never lets an exception escape C{dataReceived},
   C{hangup} or C{connectionLost}; it writes whole frames, at most one
   C{00 00 00} and nothing after it; once both connections are lost it has
   exactly one close reason and leaves no leg, connection, pacer entry or
   timer behind; and nothing is logged as a failure.

Run (see fuzz/README.rst)::

    python fuzz/fuzz_decoder.py -runs=20000 -artifact_prefix=/tmp/
    python fuzz/fuzz_decoder.py -max_total_time=120 /tmp/corpus/decoder

Importable without atheris: C{TestOneInput(data)} is plain Python, so a crash
file can be replayed with C{python fuzz/fuzz_decoder.py crash-<sha>} (atheris)
or, without atheris, by calling C{fuzz_decoder.TestOneInput(open(path, "rb").read())}.
"""

from __future__ import annotations

import uuid

import harness
from harness import Wire

with harness.instrumented(__name__):
    from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from audiohangup.audio import LegSettings
    from audiohangup.pacer import Pacer
    from audiohangup.protocol import AudioSocketProtocol
    from audiohangup.reasons import CloseReason, HangupCause, LegState, Role
    from audiohangup.registry import Registry
    from audiohangup.wire import HANGUP_FRAME, FrameDecoder, Kind, encode_frame, encode_uuid

CALL = uuid.UUID("5b0c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3")
SETTINGS = LegSettings(close_timeout=2.0, uuid_timeout=5.0, idle_timeout=3.0)
SETTINGS_ONE_LEG = LegSettings(close_timeout=2.0, uuid_timeout=5.0, idle_timeout=3.0, max_legs=1)
LOSSES = (ConnectionDone, ConnectionLost, ConnectionAborted, None)


def reference_parse(stream: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The format read the obvious way: kind, 16-bit big-endian length, payload."""
    frames = []
    index = 0
    while len(stream) - index >= 3:
        kind = stream[index]
        length = (stream[index + 1] << 8) | stream[index + 2]
        if len(stream) - index - 3 < length:
            break
        frames.append((kind, stream[index + 3 : index + 3 + length]))
        index += 3 + length
    return frames, stream[index:]


def split(data: bytes) -> tuple[int, list[bytes], bytes]:
    """The input's flags (two bytes), its stream cut in chunks, and the stream."""
    if len(data) < 2:
        return data[0] if data else 0, [b""], b""
    flags = data[0] | data[1] << 8
    count = data[0] >> 5
    raw = data[2 : 2 + 2 * count]
    stream = data[2 + 2 * count :]
    points = sorted(
        int.from_bytes(raw[i : i + 2], "big") % (len(stream) + 1) for i in range(0, len(raw) - 1, 2)
    )
    chunks, last = [], 0
    for point in points + [len(stream)]:
        chunks.append(stream[last:point])
        last = point
    return flags, chunks, stream


def check_wire(leg: AudioSocketProtocol, wire: Wire) -> None:
    assert not wire.late, f"written after loseConnection/abortConnection or loss: {wire.late!r}"
    decoder = FrameDecoder()
    frames = decoder.feed(wire.value())
    assert decoder.buffered == 0, "a partial frame was written"
    assert len(frames) == len(wire.writes), "a write held other than one whole frame"
    kinds = [frame.kind for frame in frames]
    if Kind.HANGUP in kinds:
        assert kinds.count(Kind.HANGUP) == 1, "00 00 00 written twice"
        assert frames[-1].encode() == HANGUP_FRAME, "written after 00 00 00"
    assert all(kind in (Kind.HANGUP, leg.format.kind) for kind in kinds), kinds


def check_decoder(chunks: list[bytes], stream: bytes) -> None:
    expected, rest = reference_parse(stream)
    decoder = FrameDecoder()
    frames = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
        assert decoder.buffered < 3 + 0xFFFF
    assert [(frame.kind, frame.payload) for frame in frames] == expected
    assert decoder.buffered == len(rest)
    assert b"".join(frame.encode() for frame in frames) + rest == stream
    bytewise = FrameDecoder()
    frames = []
    for index in range(len(stream)):
        frames.extend(bytewise.feed(stream[index : index + 1]))
    assert [(frame.kind, frame.payload) for frame in frames] == expected
    assert bytewise.buffered == len(rest)


def check_leg(flags: int, chunks: list[bytes]) -> None:
    clock = Clock()
    pacer = Pacer(clock)
    registry = Registry()
    settings = SETTINGS_ONE_LEG if flags & 0x1000 else SETTINGS
    resident = AudioSocketProtocol(Role.RESIDENT, registry, SETTINGS, clock, pacer)
    resident_wire = Wire(40001)
    resident.makeConnection(resident_wire)
    resident.dataReceived(encode_uuid(CALL))
    visitor = AudioSocketProtocol(Role.VISITOR, registry, settings, clock, pacer)
    visitor_wire = Wire(40000)
    visitor.makeConnection(visitor_wire)
    refused = bool(flags & 0x1000)
    assert (visitor.state is LegState.CLOSING) == refused and visitor_wire.disconnecting == refused
    if flags & 1:
        visitor.dataReceived(encode_uuid(CALL))
    for index, chunk in enumerate(chunks):
        visitor.dataReceived(chunk)
        if flags & 4:
            clock.advance(0.02 * (index + 1))
        if flags & 0x100 and index == (flags >> 9) & 7 and visitor_wire.producer is not None:
            visitor_wire.producer.pauseProducing()
            assert visitor_wire.disconnected, "a slow consumer is aborted"
        check_wire(visitor, visitor_wire)
        check_wire(resident, resident_wire)
    if flags & 2:
        visitor.hangup(HangupCause.API)
        resident.dataReceived(encode_frame(Kind.SLIN, b"\x01" * 320))
    loss = LOSSES[(flags >> 3) & 3]
    if loss is None:
        # Nobody closes: the timers (UUID, idle, close) must end it.
        clock.advance(SETTINGS.uuid_timeout + SETTINGS.idle_timeout + 0.1)
        clock.advance(SETTINGS.close_timeout + 0.1)
        loss = ConnectionAborted if visitor_wire.disconnected else ConnectionDone
        if visitor.state is LegState.LIVE:
            loss = ConnectionLost
    for leg, wire, failure in ((visitor, visitor_wire, loss), (resident, resident_wire, ConnectionDone)):
        if leg.state is LegState.CLOSED:
            continue
        wire.lost = True
        leg.connectionLost(Failure(failure()))
        assert leg.close_reason is not None
        check_wire(leg, wire)
    if refused:
        assert visitor.close_reason is CloseReason.OVER_CAPACITY, visitor.close_reason
    reasons = (visitor.close_reason, resident.close_reason)
    clock.advance(10)
    assert (visitor.close_reason, resident.close_reason) == reasons, "a close reason changed"
    assert len(registry) == 0 and registry.calls() == {} and registry.connections() == []
    assert len(pacer) == 0
    assert clock.getDelayedCalls() == [], clock.getDelayedCalls()


def TestOneInput(data: bytes) -> None:
    del harness.failures[:]
    flags, chunks, stream = split(data)
    check_decoder(chunks, stream)
    check_leg(flags, chunks)
    assert not harness.failures, [harness.failure_of(event).getTraceback() for event in harness.failures]


if __name__ == "__main__":
    harness.main(TestOneInput)
