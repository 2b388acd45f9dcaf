#!/usr/bin/env python3
"""
What a listen-in adds to each frame of the leg it hears: the tap's work on
the reactor (the frame decoded to 16-bit PCM, tagged, framed as a WebSocket
message and written to the transport), per format. The transport is
Twisted's StringTransport, so the socket's own send, which Twisted makes on
its next pass for all that was written, is not in the figure.

Run from the repository root (the repository is put first on ``sys.path``,
so this measures the working tree)::

    python bench/listen.py
"""

from __future__ import annotations

import os
import sys
import timeit
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.testing import StringTransport

from audiohangup.audio import FORMATS
from audiohangup.http.listen import _ListenSocket
from audiohangup.streams.listen import Grant, Listener
from audiohangup.wire import Frame, Kind


def per_frame(name: str, number: int = 200_000) -> float:
    """Microseconds of one frame through a listener's tap, the best of five runs."""
    fmt = FORMATS[name]
    leg = SimpleNamespace(format=fmt, role="visitor", live=True, addTap=print, removeTap=print)
    listener = Listener("LI", Grant("call", None, "bench", 0.0), [leg], "bench", SimpleNamespace())  # type: ignore[list-item,arg-type]
    transport = StringTransport()
    protocol = SimpleNamespace(state=WebSocketProtocol.STATE_OPEN, transport=transport)
    listener.socket = _ListenSocket(protocol, listener, 2000)  # type: ignore[arg-type]
    channel = listener.channels[0]
    frame = Frame(Kind.SLIN, bytes(fmt.frame_bytes))

    def one() -> None:
        channel.legAudio(frame)
        transport.clear()

    return min(timeit.repeat(one, number=number, repeat=5)) / number * 1e6


if __name__ == "__main__":
    for name in ("slin", "ulaw", "slin16"):
        print(f"{name:7} {per_frame(name):5.2f} us per frame")
