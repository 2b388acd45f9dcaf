# -*- test-case-name: tests.test_webhooks -*-
"""
An HTTP client connection pool whose responses' heads are bounded.

Twisted's client parser bounds each header line (16 KiB) but not how many
there are, so a server that sends header lines forever grows the client's
memory for as long as it likes. L{BoundedPool} makes connections that feed
their parser at most L{MAX_HEAD_BYTES} and L{MAX_HEAD_LINES} of a response's
head (its status line, its headers, and any 1xx heads before them); past
either the connection is aborted, and the request fails with a
L{ResponseHeadTooLarge} inside Twisted's C{ResponseFailed} (or
C{RequestTransmissionFailed}, when the head came before the request was out).
Bodies are the caller's to bound, as they read them.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import ITCPTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol, HTTPClientParser
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

#: Bytes of one response's head (1xx heads included) the parser is given at most.
MAX_HEAD_BYTES = 64 * 1024

#: Lines of one response's head at most, its status line one of them (Python's C{http.client} takes 100 headers).
MAX_HEAD_LINES = 100

_HEAD = (STATUS, HEADER)


class ResponseHeadTooLarge(Exception):
    """A response's head passed a bound: the server is broken or hostile."""


class _BoundedClientProtocol(HTTP11ClientProtocol):
    """Counts what it gives its parser while the parser reads a head, and aborts past the bounds."""

    _counted: HTTPClientParser | None = None
    _headBytes = 0
    _headLines = 0
    _refused: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._refused is not None:
            return  # aborted: the rest of this read goes nowhere
        parser = self._parser
        if parser is None or parser.state not in _HEAD:
            super().dataReceived(data)
            return
        if parser is not self._counted:  # a new response (a 1xx resets the same parser: counted with it)
            self._counted, self._headBytes, self._headLines = parser, 0, 0
        room = MAX_HEAD_BYTES - self._headBytes
        head, rest = data[:room], data[room:]
        self._headBytes += len(head)
        self._headLines += head.count(b"\n")
        super().dataReceived(head)
        if self._parser is not parser:
            return  # the response is over (or failed): Twisted drops what follows it too
        if parser.state not in _HEAD:
            if rest:
                super().dataReceived(rest)  # the body, or the end of the response
        elif rest:
            self._refuse(f"the response head passed {MAX_HEAD_BYTES} bytes")
        elif self._headLines > MAX_HEAD_LINES:
            self._refuse(f"the response head passed {MAX_HEAD_LINES} lines")

    def _refuse(self, why: str) -> None:
        self._refused = Failure(ResponseHeadTooLarge(why))
        # TCP, and TLS over it, can abort: stop reading now, not after a graceful close.
        cast(ITCPTransport, self.transport).abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        # The request fails with why we aborted, not with the abort itself.
        super().connectionLost(self._refused or reason)


class _BoundedClientFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr: object) -> _BoundedClientProtocol:
        return _BoundedClientProtocol(self._quiescentCallback)


class BoundedPool(HTTPConnectionPool):
    """An C{HTTPConnectionPool} whose connections bound every response's head."""

    _factory = _BoundedClientFactory


__all__ = ["MAX_HEAD_BYTES", "MAX_HEAD_LINES", "BoundedPool", "ResponseHeadTooLarge"]
