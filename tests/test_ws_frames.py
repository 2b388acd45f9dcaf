"""
A stream's own WebSocket data frames (audiohangup/streams/frames.py): built
and read without autobahn, so checked byte for byte against an independent
reading of RFC 6455 here, and over loopback against autobahn's server
(tests/ws_app.py), which accepts or refuses them as any peer would.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock

from audiohangup.audio import FORMATS
from audiohangup.codecs import encode as g711_encode
from audiohangup.relay import fast_paths
from audiohangup.streams import client as stream_client
from audiohangup.streams.frames import BINARY, TEXT, MaskKeys, client_frame, mask, whole_data_frame
from audiohangup.streams.messages import text
from audiohangup.streams.twilio import TwilioProtocol
from tests.conftest import until
from tests.tls import SelfSigned, self_signed
from tests.ws_app import App

SIZES = (0, 1, 125, 126, 65535, 65536)


def read_frame(frame: bytes) -> tuple[int, bool, bytes]:
    """RFC 6455 5.2, read the slow and obvious way: (first byte, masked, unmasked payload)."""
    first, second = frame[0], frame[1]
    size, at = second & 0x7F, 2
    if size == 126:
        size, at = int.from_bytes(frame[2:4], "big"), 4
    elif size == 127:
        size, at = int.from_bytes(frame[2:10], "big"), 10
    masked = bool(second & 0x80)
    key = frame[at : at + 4] if masked else b"\0\0\0\0"
    at += 4 if masked else 0
    body = frame[at:]
    assert len(body) == size
    return first, masked, bytes(byte ^ key[i % 4] for i, byte in enumerate(body))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_a_client_frame_is_masked_and_decodes(size: int, opcode: int) -> None:
    payload = os.urandom(size)
    key = b"\x8a\x01\xff\x37"
    frame = client_frame(opcode, payload, key)
    first, masked, body = read_frame(frame)
    assert first == 0x80 | opcode  # FIN, no extension bits
    assert masked
    assert body == payload
    header = 2 + (0 if size < 126 else 2 if size < 65536 else 8)
    assert frame[header : header + 4] == key
    assert len(frame) == header + 4 + size  # the shortest length encoding


def test_masking_is_its_own_inverse() -> None:
    for size in (1, 2, 3, 4, 5, 299, 300):
        payload = os.urandom(size)
        assert mask(mask(payload, b"abcd"), b"abcd") == payload
        assert mask(payload, b"\0\0\0\0") == payload


def test_mask_keys_are_fresh() -> None:
    keys = MaskKeys()
    drawn = [keys.next() for _ in range(MaskKeys.BATCH // 4 * 2 + 3)]  # across refills
    assert all(len(key) == 4 for key in drawn)
    assert len(set(drawn)) > len(drawn) * 0.99


def server_frame(opcode: int, payload: bytes, first: int | None = None) -> bytes:
    size = len(payload)
    if size < 126:
        head = bytes((first if first is not None else 0x80 | opcode, size))
    elif size < 65536:
        head = bytes((first if first is not None else 0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first if first is not None else 0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return head + payload


@pytest.mark.parametrize("size", SIZES)
def test_a_whole_server_frame_is_found(size: int) -> None:
    payload = os.urandom(size)
    data = server_frame(BINARY, payload) + b"\x81\x05next"
    found = whole_data_frame(data, 1 << 20)
    assert found is not None
    opcode, start, end = found
    assert opcode == BINARY and data[start:end] == payload
    assert whole_data_frame(data[: end - 1], 1 << 20) is None if size else found == (BINARY, 2, 2)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x81",
        server_frame(TEXT, b"x" * 300)[:3],  # its length not yet whole
        server_frame(TEXT, b"abc", first=0x01),  # not final: a fragment
        server_frame(TEXT, b"abc", first=0x00),  # a continuation
        server_frame(TEXT, b"abc", first=0xC1),  # an extension bit (compressed)
        server_frame(TEXT, b"abc", first=0x89),  # a ping
        server_frame(TEXT, b"abc", first=0x88),  # a close
        server_frame(TEXT, b"abc", first=0x83),  # a reserved opcode
        b"\x81\x83abcdxyz",  # masked: a server's frames are not
        b"\x82\x7e\x00\x05hello",  # a 16-bit length for 5 bytes
        b"\x82\x7f" + (300).to_bytes(8, "big") + b"x" * 300,  # a 64-bit length for 300 bytes
        server_frame(BINARY, b"x" * 101),  # over the limit
    ],
)
def test_anything_else_is_left_to_autobahn(data: bytes) -> None:
    assert whole_data_frame(data, 100) is None


class Stream:
    """What the WebSocket client reports to, recording it all."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.websocket: Any = None
        self.messages: list[tuple[bytes, bool]] = []
        self.ended: tuple[bool, int | None, str] | None = None
        self.failure: str | None = None

    def opened(self, websocket: Any) -> None:
        self.websocket = websocket

    def messageReceived(self, payload: bytes, binary: bool) -> None:
        self.messages.append((payload, binary))

    def closed(self, clean: bool, code: int | None, reason: str) -> None:
        self.ended = (clean, code, reason)

    def connectFailed(self, reason: str) -> None:
        self.failure = reason


async def open_stream(app: App, trust: Any = None) -> Stream:
    stream = Stream(app.url())
    stream_client.connect(stream, reactor, headers={}, timeout=10, max_unsent_ms=60000, trust_root=trust)  # type: ignore[arg-type]
    await until(lambda: stream.websocket is not None or stream.failure, what="the WebSocket")
    assert stream.failure is None
    await app.connections[0].opened
    return stream


def payloads() -> list[tuple[bytes, bool]]:
    return [(b"t" * size, False) for size in SIZES] + [(os.urandom(size), True) for size in SIZES]


@contextlib.asynccontextmanager
async def listening(tls: SelfSigned | None = None) -> AsyncIterator[App]:
    app = await App().listen(tls=tls)
    try:
        yield app
    finally:
        await app.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "tls",
    [pytest.param(False, marks=pytest.mark.skipif(not fast_paths(), reason="the direct send is off (AUDIOHANGUP_FAST_PATHS)")), True],
)
async def test_autobahn_accepts_our_frames(tmp_path: Path, tls: bool) -> None:
    """On plain TCP straight to the socket (with TCP_NODELAY), under TLS through its transport."""
    certificate = self_signed(tmp_path) if tls else None
    async with listening(certificate) as app:
        stream = await open_stream(app, trust=Certificate.loadPEM(certificate.pem) if certificate else None)
        protocol = stream.websocket.protocol
        if tls:
            assert protocol._socket is None
        else:
            sock = protocol.transport.getHandle()
            assert protocol._socket is sock
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sent = payloads()
        for payload, binary in sent:
            stream.websocket.send((payload, binary), False)
        connection = app.connections[0]
        await until(lambda: len(connection.messages) >= len(sent), what="every frame at the app")
        assert [(m.payload, m.binary) for m in connection.messages] == sent
        assert not connection.closed.called


@pytest_twisted.ensureDeferred
async def test_we_read_what_autobahn_sends() -> None:
    async with listening() as app:
        stream = await open_stream(app)
        connection = app.connections[0]
        sent = payloads()
        for payload, binary in sent:
            connection.protocol.sendMessage(payload, isBinary=binary)
        # autobahn's own path: a fragmented message, a ping in between, non-ASCII text.
        connection.protocol.sendMessage(b"f" * 1000, isBinary=False, fragmentSize=300)
        connection.protocol.sendPing(b"are you there")
        connection.protocol.sendMessage("¿ça va? ☎".encode(), isBinary=False)
        sent += [(b"f" * 1000, False), ("¿ça va? ☎".encode(), False)]
        await until(lambda: len(stream.messages) >= len(sent), what="every message at the stream")
        assert stream.messages == sent
        assert stream.ended is None


@pytest_twisted.ensureDeferred
async def test_text_that_is_not_utf8_ends_the_stream_as_autobahn_would() -> None:
    async with listening() as app:
        stream = await open_stream(app)
        app.connections[0].protocol.sendFrame(opcode=1, payload=b'{"event":"\xff"}')
        await until(lambda: stream.ended is not None, what="the stream's end")
    assert stream.messages == []
    clean, _code, reason = stream.ended
    assert not clean and "invalid UTF-8" in reason  # autobahn drops the connection (it fails by drop)


@pytest.mark.parametrize("sid", ["MZ0123456789abcdef", 'odd "%d" \\ sid é'])
def test_twilio_media_from_its_template_is_what_json_makes(sid: str) -> None:
    clock = Clock()
    protocol = TwilioProtocol(sid, "call", FORMATS["slin"], {}, clock)
    protocol.opening()
    for n in range(3):
        clock.advance(0.02)
        audio = bytes(range(n, n + 200)) + bytes(120)
        payload, binary = protocol.media(audio)
        expected = text({
            "event": "media", "sequenceNumber": str(n + 2), "streamSid": sid,
            "media": {
                "track": "inbound", "chunk": str(n + 1), "timestamp": str(20 * (n + 1)),
                "payload": base64.b64encode(g711_encode(audio, FORMATS["ulaw"])).decode(),
            },
        })
        assert (payload, binary) == expected
