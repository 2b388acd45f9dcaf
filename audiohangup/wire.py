# -*- test-case-name: tests.test_wire -*-
"""
The AudioSocket wire format: frame kinds, an incremental decoder and the
frame builder (L{encode_frame}).

Pure code, no I/O: the protocol feeds it bytes and writes what it builds, so
every split of the stream Asterisk may produce can be tested without sockets.
A frame is C{kind} (1 byte), C{length} (2 bytes, big endian) and C{length}
bytes of payload, in both directions.

"Wire" in this package means this format only. L{encode_frame} builds a frame
from its payload; L{audiohangup.codecs} converts the audio inside one.
"""

from __future__ import annotations

import enum
import struct
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

HEADER: Final = struct.Struct("!BH")
HEADER_SIZE: Final = HEADER.size

#: The format's own limit: the length field is 16 bits.
MAX_PAYLOAD: Final = 0xFFFF


class Kind(enum.IntEnum):
    """Frame kinds Asterisk knows (C{include/asterisk/res_audiosocket.h})."""

    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    SLIN = 0x10
    SLIN12 = 0x11
    SLIN16 = 0x12
    SLIN24 = 0x13
    SLIN32 = 0x14
    SLIN44 = 0x15
    SLIN48 = 0x16
    SLIN96 = 0x17
    SLIN192 = 0x18
    ERROR = 0xFF


#: Sample rate of each audio kind. 0x10 is labelled 8 kHz slin, although the
#: channel driver without C{c(slin)} sends the negotiated codec under it.
SAMPLE_RATES: Final[dict[int, int]] = {
    Kind.SLIN: 8000,
    Kind.SLIN12: 12000,
    Kind.SLIN16: 16000,
    Kind.SLIN24: 24000,
    Kind.SLIN32: 32000,
    Kind.SLIN44: 44100,
    Kind.SLIN48: 48000,
    Kind.SLIN96: 96000,
    Kind.SLIN192: 192000,
}

_KNOWN_KINDS: Final = frozenset(int(k) for k in Kind)


class ErrorCode(enum.IntFlag):
    """
    Bits of a 0xff frame's one-byte payload (the Go library's list; no Asterisk
    release writes 0xff, so seeing one usually means a framing bug upstream).
    """

    NONE = 0x00
    CALLER_HANGUP = 0x01
    FRAME_FORWARDING = 0x02
    MEMORY = 0x04


def describe_error_code(payload: bytes) -> str:
    """Name the bits of a 0xff payload: C{"caller_hangup|memory"}, C{"unknown"}."""
    if not payload:
        return "unknown"
    code = payload[0]
    names = [flag.name.lower() for flag in ErrorCode if flag.name and code & flag]
    # Plain ints: since Python 3.11, ~ on a flag keeps only the bits it names.
    rest = code & ~int(ErrorCode.CALLER_HANGUP | ErrorCode.FRAME_FORWARDING | ErrorCode.MEMORY)
    if rest:
        names.append(f"0x{rest:02x}")
    return "|".join(names) if names else "none"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. C{kind} is the raw byte, so unknown kinds survive."""

    kind: int
    payload: bytes = b""

    @property
    def known(self) -> bool:
        return self.kind in _KNOWN_KINDS

    @property
    def is_audio(self) -> bool:
        return self.kind in SAMPLE_RATES

    @property
    def sample_rate(self) -> int | None:
        """The rate the kind declares, or C{None} for a kind that is not audio."""
        return SAMPLE_RATES.get(self.kind)

    def encode(self) -> bytes:
        return encode_frame(self.kind, self.payload)


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    """
    Build one frame as a single C{bytes}, so it goes out in one
    C{transport.write}: Asterisk drops a call when a frame's pieces arrive more
    than 5 ms apart.

    @raise ValueError: the payload does not fit the 16-bit length field.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


#: C{KIND_HANGUP}: what the server sends, once, to end a leg.
HANGUP_FRAME: Final = encode_frame(Kind.HANGUP)


def encode_uuid(value: uuid.UUID) -> bytes:
    """The frame Asterisk sends first: 16 raw bytes in RFC 4122 order."""
    return encode_frame(Kind.UUID, value.bytes)


def __getattr__(name: str) -> Callable[..., bytes]:
    """
    C{encode}, this module's old name for L{encode_frame}, which custom flows
    may import: still served, with a L{DeprecationWarning}, because beside
    L{audiohangup.codecs.encode} (audio, not frames) the name misled.
    """
    if name == "encode":
        warnings.warn(
            "audiohangup.wire.encode was deprecated in audiohangup 0.2.0; use audiohangup.wire.encode_frame",
            DeprecationWarning,
            stacklevel=2,
        )
        return encode_frame
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def whole_frames(data: bytes, header: bytes, size: int) -> list[bytes] | None:
    """
    C{data} cut into whole frames of C{size} bytes that each start with
    C{header} (one kind, one length: a leg's own audio), or None if it is
    anything else (a frame cut short, another kind, a control frame): the
    fast paths' test for what may go on as it came, unparsed.
    """
    count, rest = divmod(len(data), size)
    if rest or not count:
        return None
    if count == 1:
        return [data] if data.startswith(header) else None
    frames = [data[offset:offset + size] for offset in range(0, len(data), size)]
    for frame in frames:
        if not frame.startswith(header):
            return None
    return frames


class FrameDecoder:
    """
    Bytes in, frames out, for any split of the stream.

    Follows L{twisted.protocols.basic.IntNStringReceiver}: one buffer, an offset
    moving over it, and one slice at the end, so a chunk holding many frames
    costs one copy. What stays buffered is always less than one whole frame.
    Unknown kinds come out as frames too; skipping them is the caller's choice,
    and sync is kept by their length either way.
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        #: Bytes held back waiting for the rest of a frame (an attribute, not a
        #: property: the leg's fast path asks for it on every frame).
        self.pending = b""

    @property
    def buffered(self) -> int:
        """How many bytes are held back waiting for the rest of a frame."""
        return len(self.pending)

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self.pending + data if self.pending else data
        frames: list[Frame] = []
        offset = 0
        end = len(buffer)
        unpack = HEADER.unpack_from
        while end - offset >= HEADER_SIZE:
            kind, length = unpack(buffer, offset)
            start = offset + HEADER_SIZE
            if end - start < length:
                break
            offset = start + length
            frames.append(Frame(kind, buffer[start:offset]))
        self.pending = buffer[offset:] if offset else buffer
        return frames
