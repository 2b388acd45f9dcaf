"""
A fake Asterisk for tests: plays the Asterisk side of AudioSocket legs over
real loopback TCP, including the ways Asterisk really ends them (a reset right
after reading C{00 00 00}, a clean close, never closing, never reading).
"""

from __future__ import annotations

import itertools
import socket
import struct
import uuid
from collections.abc import Sequence
from typing import Literal

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from audiohangup.wire import HANGUP_FRAME, Frame, FrameDecoder, Kind, encode_frame, encode_uuid

OnHangup = Literal["reset", "close", "ignore"]

#: 20 ms of 8 kHz slin silence, as Asterisk's app sends it.
SILENCE_20MS = encode_frame(Kind.SLIN, b"\x00" * 320)


class FakeAsterisk(Protocol):
    """
    One AudioSocket leg as Asterisk drives it.

    @ivar on_hangup: what to do on reading C{00 00 00}: C{"reset"} (SO_LINGER 0,
        the original bug's trigger), C{"close"} (FIN) or C{"ignore"} (never close).
    """

    def __init__(self, on_hangup: OnHangup = "reset", read: bool = True) -> None:
        self.on_hangup = on_hangup
        self.read = read
        self.frames: list[Frame] = []
        self.bytes_after_hangup = 0
        self._decoder = FrameDecoder()
        self.hangup_received: Deferred[None] = Deferred()
        #: Fires with the exception that ended the connection (never errbacks).
        self.closed: Deferred[BaseException] = Deferred()
        self.got_hangup = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        if not self.read:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.got_hangup:
            self.bytes_after_hangup += len(data)
            return
        frames = self._decoder.feed(data)
        for index, frame in enumerate(frames):
            self.frameReceived(frame)
            if frame.kind == Kind.HANGUP:
                self.got_hangup = True
                # Whatever came in the same chunk after the hangup counts too.
                self.bytes_after_hangup += sum(len(f.encode()) for f in frames[index + 1 :])
                self.bytes_after_hangup += self._decoder.buffered
                self.hangup_received.callback(None)
                if self.on_hangup == "reset":
                    self.reset()
                elif self.on_hangup == "close":
                    self.close()
                return

    def frameReceived(self, frame: Frame) -> None:
        """
        Keep one decoded frame. A hook: it runs before the hangup handling, so a
        subclass that notes more per frame (its arrival time) has it noted by
        the time C{hangup_received} fires.
        """
        self.frames.append(frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(reason.value)

    # Actions

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    async def send_split(self, data: bytes, offsets: Sequence[int]) -> None:
        """Write C{data} in pieces cut at C{offsets}, a few ms apart, as separate segments."""
        cuts = [0, *offsets, len(data)]
        for start, end in itertools.pairwise(cuts):
            self.transport.write(data[start:end])
            await deferLater(reactor, 0.002)

    def send_uuid(self, call_id: uuid.UUID) -> None:
        self.transport.write(encode_uuid(call_id))

    def reset(self) -> None:
        """Close with SO_LINGER 0, so the kernel sends a RST, as Asterisk's close often does."""
        self.transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.transport.abortConnection()

    def close(self) -> None:
        """
        A clean close: FIN at once, and go on reading until the server closes
        too. A full close() would be a reset whenever paced audio had arrived
        unread (the kernel sends RST then), which made "clean" a matter of
        timing; reset() is there for the reset.
        """
        self.transport.loseWriteConnection()

    @property
    def hangup_frames(self) -> int:
        return sum(1 for frame in self.frames if frame.kind == Kind.HANGUP)

    def ended_with_single_hangup(self) -> bool:
        """C{00 00 00} arrived once and nothing at all followed it."""
        return (
            self.hangup_frames == 1
            and self.frames[-1].encode() == HANGUP_FRAME
            and self.bytes_after_hangup == 0
        )


async def connect(port: int, *, source: str | None = None, **options: object) -> FakeAsterisk:
    """Open one leg to the server's port on loopback, from C{source} (an address of 127.0.0.0/8) if given."""
    bind = None if source is None else (source, 0)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind)
    return await connectProtocol(endpoint, FakeAsterisk(**options))  # type: ignore[arg-type]
