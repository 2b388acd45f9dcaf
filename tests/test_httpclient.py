"""
The bounded HTTP client protocol on a StringTransport: a response head past
64 KiB or 100 lines fails the request with the bound it passed and aborts the
connection, whether the request was still going out or not; 1xx heads count
towards the bound; a body, however large, does not.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request, RequestTransmissionFailed, ResponseFailed
from twisted.web.http_headers import Headers

from audiohangup.httpclient import MAX_HEAD_BYTES, ResponseHeadTooLarge, _BoundedClientFactory


class _Endless:
    """A request body that never finishes: the request stays TRANSMITTING."""

    length = 1

    def startProducing(self, consumer: Any) -> Deferred[None]:
        return Deferred()

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


class BoundedClientTests(SynchronousTestCase):
    def connect(self, body: Any = None) -> tuple[Any, StringTransport, Deferred[Any]]:
        protocol = _BoundedClientFactory(lambda _: None, "test").buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        sent = protocol.request(Request(b"POST", b"/hook", Headers({b"host": [b"h"]}), body, persistent=True))
        return protocol, transport, sent

    def assertRefused(self, sent: Deferred[Any], wrapper: type, bound: str) -> None:
        failure = self.failureResultOf(sent, wrapper)
        [inner] = failure.value.reasons
        self.assertIsInstance(inner.value, ResponseHeadTooLarge)
        self.assertEqual(str(inner.value), f"the response head passed {bound}")

    def test_head_over_the_bytes(self) -> None:
        protocol, transport, sent = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Flood: " + b"x" * 1000 + b"\r\n"
        for _ in range(MAX_HEAD_BYTES // len(line)):
            protocol.dataReceived(line)
        self.assertNoResult(sent)
        self.assertFalse(transport.disconnected)
        protocol.dataReceived(line * 100)  # one read: only the bytes up to the bound are parsed
        self.assertTrue(transport.disconnected)  # aborted
        self.assertLessEqual(sum(len(v) for _, v in protocol._counted.headers.getAllRawHeaders()), MAX_HEAD_BYTES)
        protocol.dataReceived(line)  # what the reactor still had: dropped
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertRefused(sent, ResponseFailed, "65536 bytes")

    def test_head_over_the_lines(self) -> None:
        protocol, transport, sent = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * 99)  # 100 lines with the status line
        self.assertFalse(transport.disconnected)
        protocol.dataReceived(b"a: b\r\n")
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertRefused(sent, ResponseFailed, "100 lines")

    def test_head_before_the_request_is_out(self) -> None:
        protocol, transport, sent = self.connect(_Endless())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * 200)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertRefused(sent, RequestTransmissionFailed, "100 lines")

    def test_interim_heads_count(self) -> None:
        protocol, transport, sent = self.connect()
        protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n" * 60)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertRefused(sent, ResponseFailed, "100 lines")

    def test_a_large_body_is_not_the_head(self) -> None:
        protocol, transport, sent = self.connect()
        body = b"y" * (2 * MAX_HEAD_BYTES)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
        received = _Collect()
        self.successResultOf(sent).deliverBody(received)
        protocol.dataReceived(body[1000:])
        self.assertEqual(b"".join(received.data), body)
        self.assertFalse(transport.disconnected)
        # The connection is reused: the next response's head is counted from 0.
        sent = protocol.request(Request(b"POST", b"/hook", Headers({b"host": [b"h"]}), None, persistent=True))
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n" + b"a: b\r\n" * 98 + b"\r\n")
        self.assertEqual(self.successResultOf(sent).code, 204)
