# -*- test-case-name: tests.test_http_edge,tests.test_security -*-
"""
The API's HTTP site, around the Klein resource: request bodies bounded (413
before a handler runs), each request's head and body bounded in time (408),
connections capped in total and per source, an address that failed
authentication too often answered 429 on every route but C{/health}, a Host
it does not serve or a cross-site change refused (L{audiohangup.http.hosts}),
and every request counted by route template and status. It is given what it
needs when it is built (L{ApiSite.forAPI}): it never reaches into the routes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from prometheus_client import CollectorRegistry, Counter
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

from audiohangup.http.access import AuthThrottle
from audiohangup.http.answers import closing_answer, json_error
from audiohangup.http.errors import ApiError, body_too_large
from audiohangup.http.hosts import ServedHosts
from audiohangup.http.request import largest_body, throttle_source
from audiohangup.listeners import ConnectionCap, Slot, _Refused
from audiohangup.logs import LogLimit
from audiohangup.metrics import series
from audiohangup.sources import IPNetwork, source_of

if TYPE_CHECKING:
    from audiohangup.http.api import ControlAPI


def route_template(app: Klein, request: http.Request) -> str:
    """The route a request matched, as declared (C{/calls/<string:call_id>}): a bounded label."""
    try:
        rule, _ = app.url_map.bind("localhost").match(
            request.path.decode("utf-8", errors="replace"), method=request.method.decode(), return_rule=True
        )
    except HTTPException:
        return "unmatched"
    return str(rule.rule)



#: What a Host header may hold (RFC 9110's uri-host and port are visible ASCII).
_HOST_BYTES = re.compile(rb"[!-~]*")

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
            self._answerEarly(ApiError(400, "bad_path", "the path is not UTF-8 once percent-decoded"))
            return
        if not self._routableHost():
            # Even for /health, which takes any name: routing would fail on it with a 500 or an HTML 400.
            self._answerEarly(ApiError(400, "bad_host", "the Host header is not a host name"))
            return
        if self.path != b"/health" and (self._offSite() or self._throttled()):
            return
        super().process()

    def _throttled(self) -> bool:
        """A source that failed authentication too often: answered 429 here."""
        site = self.apiSite
        source = throttle_source(self, site.trusted_proxies)
        wait = None if source is None else site.throttle.retry_after(source, site.clock.seconds())
        if wait is None:
            return False
        self.setHeader("retry-after", AuthThrottle.header(wait))
        self._answerEarly(ApiError(
            429, "too_many_failures",
            f"more than {site.throttle.limit} failed authentications from {source} within "
            f"{site.throttle.window:g} s; try again in {AuthThrottle.header(wait)} s",
        ))
        return True

    def _routableHost(self) -> bool:
        """
        Whether routing can take the Host: visible ASCII, and a name that IDNA
        encodes (werkzeug's C{Map.bind} raises C{BadHost} on C{.>}, which
        Twisted answers with a 500).
        """
        if any(not _HOST_BYTES.fullmatch(host) for host in self.requestHeaders.getRawHeaders(b"host", [])):
            return False
        try:
            self.getRequestHostname().decode("ascii").lower().encode("idna")
        except UnicodeError:
            return False
        return True

    def _overUnix(self) -> bool:
        """Whether the request came over a UNIX socket (whose address has no host)."""
        return not isinstance(getattr(self.getHost(), "host", None), str)

    def getRequestHostname(self) -> bytes:
        """
        The Host header's name, as Twisted has it; without one (HTTP/1.0) on a
        UNIX socket, which has no host name of its own, C{localhost}.
        """
        if self.getHeader(b"host") is None and self._overUnix():
            return b"localhost"
        name: bytes = super().getRequestHostname()
        return name

    def _offSite(self) -> bool:
        """
        A Host the API does not serve (421), or a change another site's page
        could send (403, 400): answered here. Not on a UNIX socket, which no
        page can reach and whose clients name any host (curl's C{unix},
        requests-unixsocket's quoted path): its file's mode says who may connect.
        """
        if self._overUnix():
            return False
        headers = self.requestHeaders
        origin = headers.getRawHeaders(b"origin")
        content_type = headers.getRawHeaders(b"content-type")
        refusal = self.apiSite.hosts.refusal(
            self.method.decode("latin-1"),
            [value.decode("latin-1") for value in headers.getRawHeaders(b"host", [])],
            origin[-1].decode("latin-1") if origin else None,
            content_type[-1].decode("latin-1").split(";", 1)[0].strip().lower() if content_type else "",
            self.isSecure(),
        )
        if refusal is None:
            return False
        self._answerEarly(refusal)
        return True

    def _answerEarly(self, error: ApiError) -> None:
        """A JSON error before routing; the site still counts it."""
        self.site = self.apiSite
        self.write(json_error(self, error))
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
        transport = self.channel.transport
        assert transport is not None, "a request's channel is connected until it is answered"
        transport.write(closing_answer(body_too_large(site.max_body)))
        # Closing at once with the body still arriving would make the kernel
        # reset the connection and the client could lose the answer: close our
        # side for writing, keep reading (and discarding), and abort only if
        # the client has not gone within a few seconds.
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
            self._linger = site.reactor.callLater(_LINGER_SECONDS, transport.abortConnection)
        else:
            transport.loseConnection()
        if site.requests is not None:
            site.requests.labels(route="unrouted", method="-", status="413").inc()


class _ApiChannel(http.HTTPChannel):
    """
    An HTTP connection whose every request must arrive in time: its head
    within the site's C{head_timeout} of the connection (on a kept-alive
    one, of the request's first byte), its body within C{body_timeout} of
    the head, else 408 and the connection closed. Twisted's own timeout is
    an idle one that each byte resets: a client sending a byte every few
    seconds held its descriptor for ever. It also tells the site's
    L{ConnectionCap} when its request has arrived whole (no longer evictable)
    and when it waits for the next one.
    """

    site: ApiSite
    slot: Slot | None = None
    _deadline: IDelayedCall | None = None
    _expired = False
    _evicted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._evicted:
            self.evict()
            return
        self._startDeadline(self.site.head_timeout, "head")

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and data and not self._handlingRequest and not self._expired:
            self._startDeadline(self.site.head_timeout, "head")  # a kept-alive connection's next request
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        self._cancelDeadline()
        if self.length != 0:
            self._startDeadline(self.site.body_timeout, "body")

    def allContentReceived(self) -> None:
        self._cancelDeadline()
        if self.slot is not None:
            self.slot.busy()
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Before the next pipelined request, if any, is read (and makes it busy again).
        if self.slot is not None:
            self.slot.waiting()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelDeadline()
        if self.slot is not None:
            self.slot.release()
        super().connectionLost(reason)

    def evict(self) -> None:
        """Closed to make room under the cap: it has not sent a whole request, so nothing is owed."""
        transport = self.transport
        if transport is None:
            self._evicted = True  # not connected yet: closed as it is
        else:
            # TCP and TLS can abort (a TLS close would wait for a peer that may never read).
            getattr(transport, "abortConnection", transport.loseConnection)()

    def _startDeadline(self, seconds: float, part: str) -> None:
        self._deadline = self.site.reactor.callLater(seconds, self._timedOut, seconds, part)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _timedOut(self, seconds: float, part: str) -> None:
        self._deadline = None
        self._expired = True
        site = self.site
        transport = self.transport
        assert transport is not None, "a deadline is cancelled when the connection is lost"
        transport.write(closing_answer(
            ApiError(408, "request_timeout", f"the request {part} did not arrive within {seconds:g} s")
        ))
        self.loseConnection()
        # A client that does not let the answer go gets the same bounded end as Twisted's idle timeout gives.
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        site.timedOut(transport.getPeer(), part)


#: Methods counted by name; any other is "other", so a client cannot add label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class ApiSite(Site):
    """
    The API's Site: bounds request bodies and the time a request takes to
    arrive, caps its connections (with C{cap}), and counts requests by route
    template and status.
    """

    requestFactory = _BoundedRequest
    # Plain HTTP/1.1 channels: the deadlines and the cap live in them.
    protocol = _ApiChannel  # type: ignore[assignment]
    logger = Logger()

    def __init__(
        self,
        app: Klein,
        reactor: IReactorTime | None = None,
        *,
        max_body: int,
        throttle: AuthThrottle,
        clock: IReactorTime,
        trusted_proxies: tuple[IPNetwork, ...] = (),
        metrics: CollectorRegistry | None = None,
        cap: ConnectionCap | None = None,
        head_timeout: float = 10.0,
        body_timeout: float = 30.0,
        hosts: ServedHosts | None = None,
    ) -> None:
        super().__init__(app.resource(), reactor=reactor)
        #: The routes, for the template each request is counted under.
        self.app = app
        #: The largest body a route takes; a larger one is answered 413 before any route runs.
        self.max_body = max_body
        #: The routes' throttle on failed authentication, the clock it counts on, the proxies it sees through.
        self.throttle, self.clock, self.trusted_proxies = throttle, clock, trusted_proxies
        #: The API's metrics (None: off), where the requests are counted.
        self.metrics = metrics
        self.cap = cap
        #: HTTP requests, counted in the API's metrics (None: metrics off).
        self.requests: Counter | None = None if metrics is None else series(
            metrics, Counter, "audiohangup_http_requests", "HTTP requests, by route template, method and status.",
            ["route", "method", "status"],
        )
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.hosts = hosts if hosts is not None else ServedHosts()
        self._logNow = LogLimit(60.0)

    @classmethod
    def forAPI(cls, api: ControlAPI, reactor: IReactorTime | None = None, **options: Any) -> ApiSite:
        """The site of C{api}, given at once what it needs of it: routes, throttle and clock, metrics, body bound."""
        return cls(
            api.app, reactor, throttle=api.throttle, clock=api.clock, trusted_proxies=api.trusted_proxies,
            metrics=api.metrics, max_body=largest_body(api.settings.max_queue_frames, list(api.formats.values())),
            **options,
        )

    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        channel = super().buildProtocol(addr)
        assert isinstance(channel, _ApiChannel), "ApiSite.protocol makes them"
        if self.cap is None:
            return channel
        slot = self.cap.admit(addr, channel.evict)
        if slot is None:
            return _Refused()
        channel.slot = slot
        return channel

    def timedOut(self, peer: IAddress, part: str) -> None:
        """A request that did not arrive in time: counted, and logged once a minute per source."""
        if self.requests is not None:
            self.requests.labels(route="unrouted", method="-", status="408").inc()
        source = source_of(peer) or "unix"  # by /64, so hopping addresses in one is one line a minute
        if self._logNow(source, self.reactor.seconds()):
            self.logger.info(
                "http: a request {part} from {source} did not arrive in time: 408 "
                "(logged once a minute per source)", part=part, source=source,
            )

    def log(self, request: http.Request) -> None:
        super().log(request)
        if self.requests is not None:
            method = request.method.decode("latin-1")
            self.requests.labels(
                route=route_template(self.app, request), method=method if method in _METHODS else "other",
                status=str(request.code),
            ).inc()
