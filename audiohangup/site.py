# -*- test-case-name: tests.test_api -*-
"""
The API's HTTP site, around the Klein resource: request bodies bounded (413
before a handler runs), an address that failed authentication too often
answered 429 on every route but C{/health}, and every request counted by
route template and status.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

from audiohangup.access import AuthThrottle
from audiohangup.api import MAX_BODY, ControlAPI, json_error


def route_template(app: Klein, request: http.Request) -> str:
    """The route a request matched, as declared (C{/calls/<string:call_id>}): a bounded label."""
    try:
        rule, _ = app.url_map.bind("localhost").match(
            request.path.decode("utf-8", errors="replace"), method=request.method.decode(), return_rule=True
        )
    except HTTPException:
        return "unmatched"
    return str(rule.rule)



#: How long a refused request's sender may keep sending before it is cut off.
_LINGER_SECONDS = 2.0


class _BoundedRequest(Request):
    """
    A request whose body may not exceed the site's C{max_body}: a larger one
    is answered 413 at once, from its Content-Length or as its chunks arrive,
    and the connection closed, so it never fills memory or reaches a handler.
    """

    _refused = False
    _received = 0
    _linger: IDelayedCall | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The API reads only JSON and raw audio: Twisted's form parsing would
        # only add ways to fail (it raises on some Content-Type bytes).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    @property
    def apiSite(self) -> ApiSite:
        """
        The site this request came in on. C{Site.buildProtocol} sets it on the
        channel; C{Request.site} is only set in C{process}, after the body.
        """
        site = getattr(self.channel, "site", None)
        assert isinstance(site, ApiSite), "a _BoundedRequest serves only an ApiSite"
        return site

    def process(self) -> None:
        """A path that is not UTF-8 once unquoted gets a JSON 400 here, before routing."""
        try:
            unquote_to_bytes(self.path).decode("utf-8")
        except UnicodeDecodeError:
            self._answerEarly(400, "bad_path", "the path is not UTF-8 once percent-decoded")
            return
        api = self.apiSite.api
        source = api.throttle_source(self) if self.path != b"/health" else None
        if source is not None:
            wait = api.throttle.retry_after(source, api.clock.seconds())
            if wait is not None:
                self.setHeader("retry-after", AuthThrottle.header(wait))
                self._answerEarly(
                    429, "too_many_failures",
                    f"more than {api.throttle.limit} failed authentications from {source} within "
                    f"{api.throttle.window:g} s; try again in {AuthThrottle.header(wait)} s",
                )
                return
        super().process()

    def getRequestHostname(self) -> bytes:
        """
        The Host header's name, as Twisted has it; without one (HTTP/1.0) on a
        UNIX socket, which has no host name of its own, C{localhost}.
        """
        if self.getHeader(b"host") is None and not isinstance(getattr(self.getHost(), "host", None), str):
            return b"localhost"
        name: bytes = super().getRequestHostname()
        return name

    def _answerEarly(self, status: int, code: str, message: str) -> None:
        """A JSON error before routing; the site still counts it."""
        self.site = self.apiSite
        self.write(json_error(self, status, code, message))
        self.finish()

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        if length is not None and length > self.apiSite.max_body:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.apiSite.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def connectionLost(self, reason: Failure) -> None:
        """The client went: the abort that bounded its linger is not needed (nor left behind)."""
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        site = self.apiSite
        body = json.dumps(
            {"error": {"code": "body_too_large", "message": f"the body exceeds {site.max_body} bytes"}}
        ).encode() + b"\n"
        transport = self.channel.transport
        assert transport is not None, "a request's channel is connected until it is answered"
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        # Closing at once with the body still arriving would make the kernel
        # reset the connection and the client could lose the answer: close our
        # side for writing, keep reading (and discarding), and abort only if
        # the client has not gone within a few seconds.
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
            self._linger = site.reactor.callLater(_LINGER_SECONDS, transport.abortConnection)
        else:
            transport.loseConnection()
        if site.api.metrics is not None:
            site.api.metrics.http_request("unrouted", "-", 413)


#: Methods counted by name; any other is "other", so a client cannot add label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class ApiSite(Site):
    """The API's Site: bounds request bodies, and counts requests by route template and status."""

    requestFactory = _BoundedRequest

    def __init__(self, api: ControlAPI, reactor: IReactorTime | None = None) -> None:
        super().__init__(api.app.resource(), reactor=reactor)
        self.api = api
        # The largest body a route takes: a /play prompt as long as a leg's queue, in the legs' widest format.
        self.max_body = max(MAX_BODY, *(api.settings.max_queue_frames * fmt.frame_bytes for fmt in api.formats.values()))

    def log(self, request: http.Request) -> None:
        super().log(request)
        if self.api.metrics is not None:
            method = request.method.decode("latin-1")
            self.api.metrics.http_request(
                route_template(self.api.app, request), method if method in _METHODS else "other", request.code
            )
