"""
Tests for L{audiohangup.wire}, the pure AudioSocket wire format.

Covered here, with no sockets and no reactor:

  - every kind Asterisk defines (hangup, UUID, DTMF, slin at each rate, error)
    round-trips through L{encode_frame} and L{FrameDecoder}, and L{Frame} reports the
    right C{known}, C{is_audio} and C{sample_rate} for it;
  - the names L{describe_error_code} gives to 0xff payloads;
  - the UUID frame split at every offset and fed one byte at a time, many
    frames in one chunk, the audio sizes Asterisk sends (and an odd one), the
    65535-byte maximum split over many chunks, unknown kinds skipped by their
    length and zero-length frames, each followed by a frame that must still be
    in sync (test cases 1-14 of the protocol notes, section g);
  - L{encode_frame} and L{HANGUP_FRAME} byte for byte;
  - Hypothesis properties: decoding concatenated encodings gives back the
    frames, any chunking of a stream decodes like the whole stream, and the
    decoder never holds back a whole frame;
  - L{whole_frames}, the fast paths' test: whole frames of one kind and
    length come out as they are, anything else is left to the decoder, and
    what it accepts the decoder reads the same.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from collections.abc import Iterable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from audiohangup.wire import (
    HANGUP_FRAME,
    HEADER_SIZE,
    MAX_PAYLOAD,
    SAMPLE_RATES,
    ErrorCode,
    Frame,
    FrameDecoder,
    Kind,
    describe_error_code,
    encode_frame,
    encode_uuid,
    whole_frames,
)

#: Every kind Asterisk defines, with the sample rate it declares (None if the
#: kind is not audio). Written out by hand so a kind missing from the module
#: fails the tests.
EXPECTED_KINDS: dict[int, int | None] = {
    0x00: None,
    0x01: None,
    0x03: None,
    0x10: 8000,
    0x11: 12000,
    0x12: 16000,
    0x13: 24000,
    0x14: 32000,
    0x15: 44100,
    0x16: 48000,
    0x17: 96000,
    0x18: 192000,
    0xFF: None,
}

#: Kinds Asterisk does not define (0x02 is the Go library's "silence").
UNKNOWN_KINDS: Sequence[int] = (0x02, 0x04, 0x20, 0x7F, 0xFE)

CALL_UUID = uuid.UUID("3f2a1c9e-7b6d-4e8f-a1b2-c3d4e5f60718")

DTMF_DIGITS = b"0123456789*#ABCD"


def decodeChunks(chunks: Iterable[bytes]) -> tuple[list[Frame], list[int], FrameDecoder]:
    """
    Feed C{chunks} to a new decoder.

    @return: all frames, how many frames each chunk produced, and the decoder.
    """
    decoder = FrameDecoder()
    frames: list[Frame] = []
    counts: list[int] = []
    for chunk in chunks:
        out = decoder.feed(chunk)
        counts.append(len(out))
        frames.extend(out)
    return frames, counts, decoder


def decode(stream: bytes) -> list[Frame]:
    """Decode C{stream} fed in one piece, asserting nothing is left over."""
    frames, _, decoder = decodeChunks([stream])
    assert decoder.buffered == 0, decoder.buffered
    return frames


def splitAt(stream: bytes, points: Iterable[int]) -> list[bytes]:
    """Cut C{stream} at each of C{points} (any order, duplicates allowed)."""
    cuts = [0, *sorted(set(points)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(cuts)]


def pieces(stream: bytes, size: int) -> list[bytes]:
    """Cut C{stream} into pieces of C{size} bytes (the last may be shorter)."""
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def pcm(length: int, seed: int = 0) -> bytes:
    """A recognisable, non-constant payload of C{length} bytes."""
    return bytes((seed + i * 7) % 256 for i in range(length))


frames_strategy = st.lists(
    st.builds(Frame, kind=st.integers(0, 255), payload=st.binary(max_size=2000)),
    max_size=20,
)

small_frames_strategy = st.lists(
    st.builds(Frame, kind=st.integers(0, 255), payload=st.binary(max_size=64)),
    max_size=12,
)


class KindTests(SynchronousTestCase):
    """Every kind Asterisk defines, and what L{Frame} says about it."""

    def test_kindsMatchAsterisk(self) -> None:
        """L{Kind} holds exactly the kinds of C{res_audiosocket.h}."""
        self.assertEqual({int(k) for k in Kind}, set(EXPECTED_KINDS))
        self.assertEqual(Kind.HANGUP, 0x00)
        self.assertEqual(Kind.UUID, 0x01)
        self.assertEqual(Kind.DTMF, 0x03)
        self.assertEqual(Kind.SLIN, 0x10)
        self.assertEqual(Kind.ERROR, 0xFF)

    def test_sampleRates(self) -> None:
        """C{SAMPLE_RATES} maps exactly the audio kinds 0x10-0x18 to their rates."""
        self.assertEqual(
            dict(SAMPLE_RATES),
            {kind: rate for kind, rate in EXPECTED_KINDS.items() if rate is not None},
        )

    def test_knownKindsRoundTrip(self) -> None:
        """
        A frame of each known kind comes out of the decoder as it went into
        L{encode_frame}, with C{known} true and C{is_audio} and C{sample_rate}
        matching the kind.
        """
        for kind, rate in EXPECTED_KINDS.items():
            payload = pcm(320, seed=kind) if rate else pcm(5, seed=kind)
            [frame] = decode(encode_frame(kind, payload))
            self.assertEqual(frame, Frame(kind, payload), hex(kind))
            self.assertEqual(frame.kind, kind)
            self.assertEqual(frame.payload, payload)
            self.assertTrue(frame.known, hex(kind))
            self.assertIs(frame.is_audio, rate is not None, hex(kind))
            self.assertEqual(frame.sample_rate, rate, hex(kind))

    def test_allKindsInOneStream(self) -> None:
        """One frame of every known kind back to back decodes in order."""
        expected = [Frame(kind, pcm(kind % 17, seed=kind)) for kind in EXPECTED_KINDS]
        stream = b"".join(frame.encode() for frame in expected)
        self.assertEqual(decode(stream), expected)

    def test_nonAudioKinds(self) -> None:
        """Hangup, UUID, DTMF and error frames are not audio and have no rate."""
        for kind in (Kind.HANGUP, Kind.UUID, Kind.DTMF, Kind.ERROR):
            frame = Frame(kind, b"x")
            self.assertIs(frame.is_audio, False)
            self.assertIsNone(frame.sample_rate)
            self.assertIs(frame.known, True)

    def test_unknownKindsProperties(self) -> None:
        """A kind Asterisk does not define is neither known nor audio."""
        for kind in UNKNOWN_KINDS:
            frame = Frame(kind, b"payload")
            self.assertIs(frame.known, False, hex(kind))
            self.assertIs(frame.is_audio, False, hex(kind))
            self.assertIsNone(frame.sample_rate, hex(kind))

    def test_rateConsistentSizes(self) -> None:
        """
        Kinds 0x11-0x18 carrying 20 ms of audio at their rate (640 bytes at
        16 kHz up to 7680 at 192 kHz) decode intact, map to their rate, and
        keep the stream in sync.
        """
        expected = []
        for kind in range(0x11, 0x19):
            rate = EXPECTED_KINDS[kind]
            assert rate is not None
            size = rate * 20 // 1000 * 2
            expected.append(Frame(kind, pcm(size, seed=kind)))
            expected.append(Frame(Kind.DTMF, b"5"))
        stream = b"".join(frame.encode() for frame in expected)
        frames = decode(stream)
        self.assertEqual(frames, expected)
        self.assertEqual(
            [(f.sample_rate, len(f.payload)) for f in frames if f.is_audio],
            [(12000, 480), (16000, 640), (24000, 960), (32000, 1280),
             (44100, 1764), (48000, 1920), (96000, 3840), (192000, 7680)],
        )


class ErrorCodeTests(SynchronousTestCase):
    """L{describe_error_code} names the bits of a 0xff payload."""

    def test_flagValues(self) -> None:
        """L{ErrorCode} has the Go library's bit values."""
        self.assertEqual(ErrorCode.NONE, 0x00)
        self.assertEqual(ErrorCode.CALLER_HANGUP, 0x01)
        self.assertEqual(ErrorCode.FRAME_FORWARDING, 0x02)
        self.assertEqual(ErrorCode.MEMORY, 0x04)

    def test_empty(self) -> None:
        """An empty payload is C{"unknown"}, as in the Go library."""
        self.assertEqual(describe_error_code(b""), "unknown")

    def test_none(self) -> None:
        """Code 0x00 is C{"none"}."""
        self.assertEqual(describe_error_code(b"\x00"), "none")

    def test_singleBits(self) -> None:
        """Each defined bit alone is named after its flag."""
        self.assertEqual(describe_error_code(b"\x01"), "caller_hangup")
        self.assertEqual(describe_error_code(b"\x02"), "frame_forwarding")
        self.assertEqual(describe_error_code(b"\x04"), "memory")

    def test_combinedBits(self) -> None:
        """Several bits are named in bit order, joined by C{|}."""
        self.assertEqual(describe_error_code(b"\x03"), "caller_hangup|frame_forwarding")
        self.assertEqual(
            describe_error_code(b"\x07"), "caller_hangup|frame_forwarding|memory"
        )

    def test_unknownBitsKeepKnownNames(self) -> None:
        """A code with bits beyond the defined ones still names the defined bits."""
        self.assertEqual(describe_error_code(b"\x09").split("|")[0], "caller_hangup")

    def test_unknownBitsNamed(self) -> None:
        """Bits beyond the defined ones are named in hex after the known names."""
        self.assertEqual(describe_error_code(b"\x09"), "caller_hangup|0x08")
        self.assertEqual(describe_error_code(b"\x08"), "0x08")
        self.assertEqual(
            describe_error_code(b"\xff"), "caller_hangup|frame_forwarding|memory|0xf8"
        )

    def test_errorFrameRoundTrip(self) -> None:
        """A 0xff frame decodes and its payload is described by its code."""
        stream = encode_frame(Kind.ERROR) + encode_frame(Kind.ERROR, b"\x03") + encode_frame(Kind.SLIN, b"ab")
        frames = decode(stream)
        self.assertEqual(
            frames, [Frame(Kind.ERROR), Frame(Kind.ERROR, b"\x03"), Frame(Kind.SLIN, b"ab")]
        )
        self.assertEqual(
            [describe_error_code(f.payload) for f in frames[:2]],
            ["unknown", "caller_hangup|frame_forwarding"],
        )


class UUIDFrameTests(SynchronousTestCase):
    """The 19-byte UUID frame Asterisk sends first (cases 1, 2 and 14)."""

    def test_encodeUUID(self) -> None:
        """
        L{encode_uuid} writes C{01 00 10} and the 16 bytes in RFC 4122 order,
        i.e. the hex digits of the dialplan string in order.
        """
        frame = encode_uuid(CALL_UUID)
        self.assertEqual(len(frame), 19)
        self.assertEqual(frame[:3], b"\x01\x00\x10")
        self.assertEqual(frame[3:].hex(), str(CALL_UUID).replace("-", ""))

    def test_oneSegment(self) -> None:
        """The UUID frame in one segment gives back the UUID."""
        [frame] = decode(encode_uuid(CALL_UUID))
        self.assertEqual(frame.kind, Kind.UUID)
        self.assertEqual(uuid.UUID(bytes=frame.payload), CALL_UUID)

    def test_anyUUIDVersion(self) -> None:
        """The nil UUID and non-v4 UUIDs decode like any other."""
        for value in (uuid.UUID(int=0), uuid.uuid1(), uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff")):
            [frame] = decode(encode_uuid(value))
            self.assertEqual(uuid.UUID(bytes=frame.payload), value)

    def test_splitAtEveryOffset(self) -> None:
        """
        The UUID frame cut in two at any offset, including inside the header,
        gives nothing for the first chunk and exactly the UUID frame for the
        second.
        """
        stream = encode_uuid(CALL_UUID)
        for offset in range(1, len(stream)):
            decoder = FrameDecoder()
            self.assertEqual(decoder.feed(stream[:offset]), [], offset)
            self.assertEqual(decoder.buffered, offset)
            frames = decoder.feed(stream[offset:])
            self.assertEqual(len(frames), 1, offset)
            self.assertEqual(frames[0].kind, Kind.UUID)
            self.assertEqual(uuid.UUID(bytes=frames[0].payload), CALL_UUID)
            self.assertEqual(decoder.buffered, 0)

    def test_byteAtATime(self) -> None:
        """Fed one byte at a time, the UUID frame appears on the 19th byte only."""
        stream = encode_uuid(CALL_UUID)
        decoder = FrameDecoder()
        for i in range(len(stream) - 1):
            self.assertEqual(decoder.feed(stream[i : i + 1]), [], i)
        [frame] = decoder.feed(stream[-1:])
        self.assertEqual(uuid.UUID(bytes=frame.payload), CALL_UUID)
        self.assertEqual(decoder.buffered, 0)


class StreamTests(SynchronousTestCase):
    """Many frames in one chunk, and sync across sizes (cases 3-8)."""

    def sessionFrames(self) -> list[Frame]:
        """A UUID, audio with DTMF between, then more audio."""
        return [
            Frame(Kind.UUID, CALL_UUID.bytes),
            Frame(Kind.SLIN, pcm(320, 1)),
            Frame(Kind.SLIN, pcm(320, 2)),
            Frame(Kind.DTMF, b"7"),
            Frame(Kind.SLIN, pcm(320, 3)),
            Frame(Kind.SLIN, pcm(320, 4)),
        ]

    def test_manyFramesOneChunk(self) -> None:
        """A UUID, audio and DTMF frames in a single chunk all come out in order."""
        expected = self.sessionFrames()
        stream = b"".join(f.encode() for f in expected)
        frames = decode(stream)
        self.assertEqual(frames, expected)
        self.assertEqual(uuid.UUID(bytes=frames[0].payload), CALL_UUID)

    def test_wholeSessionByteByByte(self) -> None:
        """A session fed byte by byte gives the same frames as whole-frame delivery."""
        expected = self.sessionFrames()
        stream = b"".join(f.encode() for f in expected)
        byFrame, _, _ = decodeChunks(f.encode() for f in expected)
        byByte, counts, decoder = decodeChunks(pieces(stream, 1))
        self.assertEqual(byFrame, expected)
        self.assertEqual(byByte, expected)
        self.assertEqual(sum(counts), len(expected))
        self.assertEqual(decoder.buffered, 0)

    def test_audioLengths(self) -> None:
        """
        Audio of 320, 160, 480, 640 and an odd 321 bytes decodes intact, and
        the DTMF frame after each one is in sync.
        """
        for length in (320, 160, 480, 640, 321):
            payload = pcm(length, seed=length)
            stream = encode_frame(Kind.SLIN, payload) + encode_frame(Kind.DTMF, b"#")
            self.assertEqual(
                decode(stream), [Frame(Kind.SLIN, payload), Frame(Kind.DTMF, b"#")], length
            )

    def test_audioLengthsOneStream(self) -> None:
        """The same audio sizes back to back, odd one included, stay in sync."""
        expected = [Frame(Kind.SLIN, pcm(n, seed=n)) for n in (320, 321, 160, 480, 321, 640)]
        expected.append(Frame(Kind.HANGUP))
        stream = b"".join(f.encode() for f in expected)
        self.assertEqual(decode(stream), expected)
        self.assertEqual(decodeChunks(pieces(stream, 7))[0], expected)

    def test_dtmfBetweenAudio(self) -> None:
        """Each DTMF digit, between audio frames, comes out as a 1-byte payload."""
        expected: list[Frame] = []
        for digit in DTMF_DIGITS:
            expected.append(Frame(Kind.SLIN, pcm(320, digit)))
            expected.append(Frame(Kind.DTMF, bytes([digit])))
        expected.append(Frame(Kind.SLIN, pcm(320)))
        frames = decode(b"".join(f.encode() for f in expected))
        self.assertEqual(frames, expected)
        self.assertEqual(
            b"".join(f.payload for f in frames if f.kind == Kind.DTMF), DTMF_DIGITS
        )


class MaxPayloadTests(SynchronousTestCase):
    """The 16-bit length field's limit (case 6)."""

    def test_maxPayloadManyChunks(self) -> None:
        """
        A 65535-byte payload cut into 1000-byte chunks decodes intact on the
        last chunk only, and the frame after it is in sync.
        """
        payload = pcm(MAX_PAYLOAD, seed=3)
        after = Frame(Kind.DTMF, b"9")
        stream = encode_frame(Kind.SLIN, payload) + after.encode()
        chunks = pieces(stream, 1000)
        frames, counts, decoder = decodeChunks(chunks)
        self.assertEqual(frames, [Frame(Kind.SLIN, payload), after])
        self.assertEqual(len(frames[0].payload), MAX_PAYLOAD)
        # Nothing comes out before the chunk that completes the big frame.
        firstOut = next(i for i, n in enumerate(counts) if n)
        self.assertEqual(firstOut, (HEADER_SIZE + MAX_PAYLOAD - 1) // 1000)
        self.assertEqual(decoder.buffered, 0)

    def test_maxPayloadEncodes(self) -> None:
        """A 65535-byte payload encodes with length field C{ff ff}."""
        frame = encode_frame(Kind.SLIN, bytes(MAX_PAYLOAD))
        self.assertEqual(frame[:3], b"\x10\xff\xff")
        self.assertEqual(len(frame), HEADER_SIZE + MAX_PAYLOAD)

    def test_tooLongPayload(self) -> None:
        """L{encode_frame} refuses a payload of 65536 bytes with L{ValueError}."""
        self.assertEqual(MAX_PAYLOAD, 65535)
        self.assertRaises(ValueError, encode_frame, Kind.SLIN, bytes(MAX_PAYLOAD + 1))
        self.assertRaises(ValueError, Frame(Kind.SLIN, bytes(MAX_PAYLOAD + 1)).encode)


class UnknownKindTests(SynchronousTestCase):
    """Kinds Asterisk does not define (case 10)."""

    def test_unknownKindsSkippedByLength(self) -> None:
        """
        Frames of unknown kinds come out with C{known} false and their payload,
        and the frame after each one is in sync.
        """
        expected: list[Frame] = [Frame(Kind.UUID, CALL_UUID.bytes)]
        for kind in UNKNOWN_KINDS:
            # The payload looks like headers, to catch a decoder that resyncs
            # by scanning instead of skipping by length.
            expected.append(Frame(kind, encode_frame(Kind.SLIN, b"xy") * 10 + bytes([kind])))
            expected.append(Frame(Kind.SLIN, pcm(320, kind)))
        stream = b"".join(f.encode() for f in expected)
        for chunks in ([stream], pieces(stream, 1), pieces(stream, 5)):
            frames, _, decoder = decodeChunks(chunks)
            self.assertEqual(frames, expected)
            self.assertEqual(decoder.buffered, 0)
            self.assertEqual(
                [f.known for f in frames], [True] + [False, True] * len(UNKNOWN_KINDS)
            )
            self.assertEqual(
                [f.kind for f in frames if not f.known], list(UNKNOWN_KINDS)
            )


class ZeroLengthTests(SynchronousTestCase):
    """Frames with a length of 0 (cases 7 and 12)."""

    def test_hangup(self) -> None:
        """C{00 00 00} decodes as a hangup frame with an empty payload."""
        self.assertEqual(decode(HANGUP_FRAME), [Frame(Kind.HANGUP, b"")])

    def test_emptyAudio(self) -> None:
        """Audio of length 0 is an empty frame and the next frame is in sync."""
        stream = encode_frame(Kind.SLIN) + encode_frame(Kind.SLIN16, b"") + encode_frame(Kind.SLIN, b"ab")
        self.assertEqual(
            decode(stream),
            [Frame(Kind.SLIN, b""), Frame(Kind.SLIN16, b""), Frame(Kind.SLIN, b"ab")],
        )

    def test_emptyFramesBytewise(self) -> None:
        """Zero-length frames fed byte by byte each appear on their third byte."""
        stream = HANGUP_FRAME + encode_frame(Kind.SLIN) + HANGUP_FRAME
        frames, counts, _ = decodeChunks(pieces(stream, 1))
        self.assertEqual(frames, [Frame(Kind.HANGUP), Frame(Kind.SLIN), Frame(Kind.HANGUP)])
        self.assertEqual(counts, [0, 0, 1] * 3)


class EncodeTests(SynchronousTestCase):
    """L{encode_frame}, L{Frame.encode} and L{HANGUP_FRAME}."""

    def test_hangupFrame(self) -> None:
        """L{HANGUP_FRAME} is exactly C{00 00 00}."""
        self.assertEqual(HANGUP_FRAME, b"\x00\x00\x00")
        self.assertIsInstance(HANGUP_FRAME, bytes)
        self.assertEqual(encode_frame(Kind.HANGUP), HANGUP_FRAME)

    def test_headerLayout(self) -> None:
        """The header is the kind byte then the big-endian 16-bit length."""
        self.assertEqual(HEADER_SIZE, 3)
        self.assertEqual(encode_frame(0x10, bytes(320)), b"\x10\x01\x40" + bytes(320))
        self.assertEqual(encode_frame(0x03, b"*"), b"\x03\x00\x01*")
        self.assertEqual(encode_frame(0xFF, b"\x02"), b"\xff\x00\x01\x02")

    def test_frameEncode(self) -> None:
        """L{Frame.encode} gives the same bytes as L{encode_frame}."""
        self.assertEqual(Frame(Kind.DTMF, b"1").encode(), encode_frame(Kind.DTMF, b"1"))
        self.assertEqual(Frame(Kind.HANGUP).encode(), HANGUP_FRAME)

    @given(kind=st.integers(0, 255), payload=st.binary(max_size=3000))
    @settings(max_examples=100)
    def test_singleBytesObject(self, kind: int, payload: bytes) -> None:
        """L{encode_frame} returns one C{bytes} equal to C{struct.pack("!BH")} plus the payload."""
        out = encode_frame(kind, payload)
        self.assertIs(type(out), bytes)
        self.assertEqual(out, struct.pack("!BH", kind, len(payload)) + payload)

    def test_oldNameDeprecated(self) -> None:
        """C{wire.encode}, the old name custom flows may import, is L{encode_frame} with a warning naming it."""
        from audiohangup import wire

        old = wire.encode
        [warning] = self.flushWarnings([self.test_oldNameDeprecated])
        self.assertIs(old, encode_frame)
        self.assertIs(warning["category"], DeprecationWarning)
        self.assertEqual(
            warning["message"], "audiohangup.wire.encode was deprecated in audiohangup 0.2.0; use audiohangup.wire.encode_frame"
        )
        self.assertRaises(AttributeError, getattr, wire, "encoder")


class BufferingTests(SynchronousTestCase):
    """What the decoder holds back between chunks."""

    def test_emptyFeed(self) -> None:
        """Feeding nothing yields nothing and changes nothing."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered, 0)
        decoder.feed(b"\x10\x00")
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered, 2)

    def test_truncatedFrame(self) -> None:
        """A frame cut inside its payload yields nothing and stays buffered."""
        decoder = FrameDecoder()
        frames = decoder.feed(encode_uuid(CALL_UUID) + encode_frame(Kind.SLIN, bytes(320))[:100])
        self.assertEqual(len(frames), 1)
        self.assertEqual(decoder.buffered, 100)

    @given(frames=frames_strategy, data=st.data())
    @settings(max_examples=150)
    def test_bufferedLessThanOneFrame(self, frames: list[Frame], data: st.DataObject) -> None:
        """
        After any chunk, the decoder holds exactly the start of the frame being
        assembled, which is always less than that frame's size, and has
        emitted every frame that ended before the cut.
        """
        encoded = [f.encode() for f in frames]
        stream = b"".join(encoded)
        ends: list[int] = []
        position = 0
        for chunk in encoded:
            position += len(chunk)
            ends.append(position)
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
        decoder = FrameDecoder()
        emitted = 0
        fed = 0
        for chunk in splitAt(stream, points):
            emitted += len(decoder.feed(chunk))
            fed += len(chunk)
            complete = sum(1 for end in ends if end <= fed)
            self.assertEqual(emitted, complete)
            start = ends[complete - 1] if complete else 0
            self.assertEqual(decoder.buffered, fed - start)
            if decoder.buffered:
                self.assertLess(decoder.buffered, len(encoded[complete]))
        self.assertEqual(decoder.buffered, 0)


class PropertyTests(SynchronousTestCase):
    """Hypothesis properties of the decoder."""

    @given(frames=frames_strategy)
    @settings(max_examples=200)
    def test_roundTrip(self, frames: list[Frame]) -> None:
        """Decoding concatenated encodings gives back exactly those frames."""
        stream = b"".join(f.encode() for f in frames)
        decoded = decode(stream)
        self.assertEqual(decoded, frames)
        for frame in decoded:
            self.assertIs(type(frame.payload), bytes)

    @given(frames=frames_strategy, data=st.data())
    @settings(max_examples=150)
    def test_anyChunking(self, frames: list[Frame], data: st.DataObject) -> None:
        """Any chunking of a stream yields the same frames as the whole stream."""
        stream = b"".join(f.encode() for f in frames)
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=30), label="cuts")
        chunked, _, decoder = decodeChunks(splitAt(stream, points))
        self.assertEqual(chunked, decode(stream))
        self.assertEqual(chunked, frames)
        self.assertEqual(decoder.buffered, 0)

    @given(frames=small_frames_strategy)
    @settings(max_examples=100)
    def test_byteAtATime(self, frames: list[Frame]) -> None:
        """A stream fed one byte at a time yields the same frames as the whole."""
        stream = b"".join(f.encode() for f in frames)
        bytewise, counts, decoder = decodeChunks(pieces(stream, 1))
        self.assertEqual(bytewise, frames)
        self.assertTrue(all(n <= 1 for n in counts))
        self.assertEqual(decoder.buffered, 0)

    @given(stream=st.binary(max_size=600), data=st.data())
    @settings(max_examples=200)
    def test_arbitraryBytes(self, stream: bytes, data: st.DataObject) -> None:
        """
        For any bytes at all, complete or not, chunked and bytewise feeding
        give the same frames and leave the same remainder as one feed.
        """
        whole, _, wholeDecoder = decodeChunks([stream])
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
        chunked, _, chunkedDecoder = decodeChunks(splitAt(stream, points))
        bytewise, _, bytewiseDecoder = decodeChunks(pieces(stream, 1))
        self.assertEqual(chunked, whole)
        self.assertEqual(bytewise, whole)
        self.assertEqual(chunkedDecoder.buffered, wholeDecoder.buffered)
        self.assertEqual(bytewiseDecoder.buffered, wholeDecoder.buffered)
        consumed = sum(HEADER_SIZE + len(f.payload) for f in whole)
        self.assertEqual(consumed + wholeDecoder.buffered, len(stream))
        self.assertEqual(b"".join(f.encode() for f in whole), stream[:consumed])


class WholeFramesTests(SynchronousTestCase):
    """L{whole_frames}: what the link's fast paths may send on unparsed."""

    header = struct.pack("!BH", Kind.SLIN, 320)
    size = HEADER_SIZE + 320

    def cut(self, data: bytes) -> list[bytes] | None:
        return whole_frames(data, self.header, self.size)

    def test_oneFrame(self) -> None:
        frame = encode_frame(Kind.SLIN, pcm(320))
        self.assertEqual(self.cut(frame), [frame])

    def test_manyFrames(self) -> None:
        frames = [encode_frame(Kind.SLIN, pcm(320, seed)) for seed in range(3)]
        self.assertEqual(self.cut(b"".join(frames)), frames)

    def test_anythingElse(self) -> None:
        """A frame cut short, a byte over, another kind or length, a control frame among audio: the decoder's."""
        audio = encode_frame(Kind.SLIN, pcm(320))
        for data in (
            b"",
            audio[:-1],
            audio + audio[:1],
            encode_frame(Kind.SLIN16, pcm(320)),
            encode_frame(Kind.SLIN, pcm(160)) * 2 + encode_frame(Kind.DTMF, b"1") + b"\x00" * 2,
            audio + encode_frame(0xF0, pcm(320)),
            encode_frame(Kind.DTMF, b"1") + audio[: self.size - 4],
        ):
            self.assertIsNone(self.cut(data), data[:8])

    @given(frames=st.lists(st.sampled_from([Kind.SLIN, Kind.SLIN16, Kind.DTMF]), min_size=1, max_size=6))
    @settings(max_examples=100)
    def test_decodesTheSame(self, frames: list[int]) -> None:
        """Whatever it accepts is whole frames the decoder reads the same: nothing held back, nothing skipped."""
        stream = b"".join(encode_frame(kind, pcm(320 if kind != Kind.DTMF else 1, n)) for n, kind in enumerate(frames))
        cut = self.cut(stream)
        if all(kind == Kind.SLIN for kind in frames):
            assert cut is not None
            self.assertEqual([Frame(Kind.SLIN, data[HEADER_SIZE:]) for data in cut], decode(stream))
        else:
            self.assertIsNone(cut)
