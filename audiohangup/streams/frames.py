# -*- test-case-name: tests.test_ws_frames -*-
"""
The WebSocket frames a stream sends and receives on every 20 ms frame,
built and read without autobahn (RFC 6455, section 5.2). Pure code.

autobahn spends about as much on a 300-byte data frame as the rest of the
stream together: framing and dispatch in Python, a CFFI masker made per
frame, debug-log arguments built for lines that are dropped. A stream's own
messages need none of it: they are whole (never fragmented), uncompressed
(we offer no extension) and small. So these are built here, and the
application's whole, final, unmasked data frames are read here; anything
else (control frames, fragments, a frame not yet whole, anything invalid) is
left to autobahn, which answers it as it always did.
"""

from __future__ import annotations

import os
import struct

#: Opcodes of the data frames (text is UTF-8, binary anything).
TEXT = 0x1
BINARY = 0x2

_FIN = 0x80
_MASKED = 0x80
_TINY = struct.Struct("!BB")
_SHORT = struct.Struct("!BBH")  # 126: a 16-bit length follows
_LONG = struct.Struct("!BBQ")  # 127: a 64-bit length follows


class MaskKeys:
    """
    Masking keys for a client's frames. RFC 6455 (5.3) asks for keys that a
    page script cannot predict (they keep it from choosing the bytes a proxy
    sees): from the system's CSPRNG, read in batches, as a syscall per frame
    would cost more than the masking itself.
    """

    BATCH = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        at = self._at
        if at + 4 > len(self._pool):
            self._pool, at = os.urandom(self.BATCH), 0
        self._at = at + 4
        return self._pool[at : at + 4]


def mask(payload: bytes, key: bytes) -> bytes:
    """C{payload} XOR the repeated 4-byte C{key}: one big-integer XOR, about 1 µs for 300 bytes."""
    size = len(payload)
    stream = key * (size // 4 + 1)
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream[:size], "little")).to_bytes(size, "little")


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One whole masked frame from a client: FIN, no extension bits, C{key} as its mask."""
    size = len(payload)
    if size < 126:
        head = _TINY.pack(_FIN | opcode, _MASKED | size)
    elif size < 0x10000:
        head = _SHORT.pack(_FIN | opcode, _MASKED | 126, size)
    else:
        head = _LONG.pack(_FIN | opcode, _MASKED | 127, size)
    return b"".join((head, key, mask(payload, key)))


def whole_data_frame(data: bytes, limit: int) -> tuple[int, int, int] | None:
    """
    If C{data} starts with a whole, final, unmasked text or binary frame with
    no extension bits, of at most C{limit} bytes, in the shortest length
    encoding: its opcode and where its payload starts and ends. None for
    anything else, for autobahn to read (and to refuse, if it is invalid).
    """
    if len(data) < 2:
        return None
    first = data[0]
    if first != _FIN | TEXT and first != _FIN | BINARY:
        return None
    size = data[1]  # the mask bit is 0: a server's frames are not masked
    start = 2
    if size == 126:
        if len(data) < 4:
            return None
        size = (data[2] << 8) | data[3]
        if size < 126:
            return None
        start = 4
    elif size == 127:
        if len(data) < 10:
            return None
        size = int.from_bytes(data[2:10], "big")
        if size < 0x10000:
            return None
        start = 10
    elif size > 127:
        return None  # masked
    end = start + size
    if size > limit or end > len(data):
        return None
    return first & 0x0F, start, end
