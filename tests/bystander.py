"""
An unrelated live call that a hostile-peer test keeps running beside its
attack: a bridged visitor and resident on loopback, the visitor sending
numbered 20 ms frames on the clock, the resident counting those that reach it.

A test asserts that the call kept (say) 95 % of its frames while the attack
ran: a server that a peer can exhaust (descriptors, memory, the reactor)
loses or delays the bystander's audio, and that is what the bound is for.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater

from audiohangup.wire import Frame, Kind, encode_frame
from tests.conftest import until
from tests.fake_asterisk import FakeAsterisk, connect

#: The marker at the start of each numbered frame's payload.
_MARK = b"BYST"
_FRAME_SECONDS = 0.02


class _Counting(FakeAsterisk):
    """A resident that notes the numbers of the bystander's frames it hears, and drops the rest."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.heard: set[int] = set()
        self.arrivals: list[float] = []

    def frameReceived(self, frame: Frame) -> None:
        if frame.kind == Kind.SLIN and frame.payload[:4] == _MARK:
            self.heard.add(struct.unpack(">I", frame.payload[4:8])[0])
            self.arrivals.append(reactor.seconds())
        elif frame.kind == Kind.HANGUP:
            super().frameReceived(frame)


class Bystander:
    """One bridged call whose visitor streams numbered frames in real time (catching up after a stall)."""

    def __init__(self, call_id: uuid.UUID, visitor: FakeAsterisk, resident: _Counting) -> None:
        self.call_id = call_id
        self.visitor = visitor
        self.resident = resident
        self.sent = 0
        self._start = 0.0
        self._loop = LoopingCall(self._send)

    @classmethod
    async def start(cls, visitor_port: int, resident_port: int, registry: Any) -> Bystander:
        """Connect both legs, wait until the server holds both, and start the visitor's audio."""
        call_id = uuid.uuid4()
        visitor = await connect(visitor_port, on_hangup="close")
        resident = _Counting(on_hangup="close")
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", resident_port), resident)
        visitor.send_uuid(call_id)
        resident.send_uuid(call_id)
        key = str(call_id)
        await until(lambda: len(registry.call(key)) == 2, what="the bystander's two legs")
        self = cls(call_id, visitor, resident)
        self._start = reactor.seconds()
        self._loop.start(_FRAME_SECONDS, now=True)
        return self

    def _send(self) -> None:
        """Every frame due by now: a reactor that ran late is caught up on, as Asterisk's own clock would."""
        due = int((reactor.seconds() - self._start) / _FRAME_SECONDS) + 1
        while self.sent < due:
            payload = _MARK + struct.pack(">I", self.sent)
            self.visitor.send(encode_frame(Kind.SLIN, payload.ljust(320, b"\x01")))
            self.sent += 1

    async def stop(self, grace: float = 1.0) -> float:
        """
        Stop sending, give the frames in flight C{grace} seconds to arrive,
        and answer the share of the sent frames the resident heard.
        """
        if self._loop.running:
            self._loop.stop()
        deadline = reactor.seconds() + grace
        while len(self.resident.heard) < self.sent and reactor.seconds() < deadline:
            await deferLater(reactor, 0.01)
        return len(self.resident.heard) / max(1, self.sent)

    def close(self) -> None:
        """End both legs from the Asterisk side (a clean close each)."""
        if self._loop.running:
            self._loop.stop()
        for leg in (self.visitor, self.resident):
            if leg.transport is not None and leg.transport.connected:
                leg.close()
