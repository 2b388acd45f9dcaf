# -*- test-case-name: tests.test_streams -*-
"""
Every media stream of this instance: opened for each new leg with
C{--stream-url}, or for one call through the API; ended with its leg, by a
DELETE, or by the application; counted, reported to webhooks, and never the
reason a leg stays open.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autobahn.websocket.util import parse_url
from hyperlink import URL
from prometheus_client import CollectorRegistry, Counter
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.events import LegObserver
from audiohangup.interfaces import ILegObserver, IReactor, IServerLeg
from audiohangup.lifecycle import Part, within
from audiohangup.logs import redact
from audiohangup.metrics import StreamTotals, series
from audiohangup.reasons import Role
from audiohangup.relay import Relay
from audiohangup.streams import client
from audiohangup.streams.messages import IStreamProtocol
from audiohangup.streams.native import AudiohangupProtocol
from audiohangup.streams.stream import Counts, IStreamObserver, MediaStream, Mode, Outcome, StreamSettings
from audiohangup.streams.twilio import TwilioProtocol
from audiohangup.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER

if TYPE_CHECKING:
    from audiohangup.webhooks import Webhooks

PROTOCOLS = ("twilio", "audiohangup")
MODES = tuple(mode.value for mode in Mode)
FAILURE_POLICIES = ("continue", "hangup")
#: What a bridged leg hears while its app speaks: the app alone, or both summed.
AUDIO_POLICIES = ("floor", "mix")

#: Streams one leg may have over its life (live or ended): bounds what a leg keeps of them.
MAX_STREAMS_PER_LEG = 16
#: Custom parameters and headers a stream may carry, and their size.
MAX_FIELDS = 32
MAX_FIELD_BYTES = 1024

#: A header name is an RFC 9110 token (5.1, 5.6.2), all of it (C{fullmatch}).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: What a header value may not hold: control characters (RFC 9110 5.5: NUL,
#: CR and LF never; the other C0 and DEL neither), but for HTAB.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Headers the handshake sets itself (autobahn, and the signature): never a second time, in any case.
_RESERVED = {
    "host", "upgrade", "connection", "content-length", "transfer-encoding", "user-agent", "pragma", "cache-control",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions",
    SIGNATURE_HEADER.lower(), TIMESTAMP_HEADER.lower(),
}
#: A stream URL holds only what RFC 3986 allows (ASCII letters, digits and
#: its delimiters; C{%} only before two hex digits): no whitespace or control
#: character that would end up in the request line.
_URL = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")


class StreamRefused(Exception):
    """Why a stream cannot be opened; the API answers each kind with its own status and code."""


class BadStreamField(StreamRefused, ValueError):
    """A field of a stream's request (C{field}: url, protocol, mode, parameters, headers) that is not taken."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class BadStreamURL(BadStreamField):
    """A stream URL that is not a ws:// or wss:// URL the WebSocket client takes."""

    def __init__(self, message: str) -> None:
        super().__init__("url", message)


class LegNotLive(StreamRefused):
    """The leg has ended, or is ending: no stream opens on it."""


class TooManyStreams(StreamRefused):
    """The leg has had L{MAX_STREAMS_PER_LEG} streams already."""


class AlreadyConversing(StreamRefused):
    """The leg has a converse stream already: only one app may speak on it."""


@dataclass(frozen=True)
class StreamConfig:
    """The --stream-* options."""

    url: str | None = None
    roles: tuple[Role, ...] = (Role.VISITOR, Role.RESIDENT)
    protocol: str = "twilio"
    mode: str = "converse"
    connect_timeout: float = 5.0
    failure: str = "continue"
    audio: str = "floor"
    max_unsent_ms: int = 2000
    max_queue_ms: int = 60000
    headers: tuple[tuple[str, str], ...] = ()
    secret: str | None = None
    ca: str | None = None
    settings: StreamSettings = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", StreamSettings(
            max_queue_ms=self.max_queue_ms, failure=self.failure, audio=self.audio,
        ))


def check_url(template: object) -> str:
    """A ws:// or wss:// URL with a host, C{{call_id}} and C{{role}} allowed in it; else L{BadStreamURL}."""
    if not isinstance(template, str) or not template:
        raise BadStreamURL("the stream URL must be a ws:// or wss:// URL")
    filled = fill(template, "0" * 36, "visitor")
    if not _URL.fullmatch(filled):
        raise BadStreamURL(
            "the stream URL holds a character a URL may not (whitespace, a control character, "
            "or one to percent-encode)",
        )
    try:
        parsed = URL.from_text(filled)
    except Exception as error:  # hyperlink raises several types for a URL it cannot parse
        raise BadStreamURL(f"the stream URL does not parse: {error}") from None
    if parsed.scheme not in ("ws", "wss") or not parsed.host:
        raise BadStreamURL("the stream URL must be ws:// or wss:// with a host")
    if parsed.userinfo:
        raise BadStreamURL("credentials in the stream URL are not supported; use a header")
    try:
        parse_url(parsed.to_text())  # what the WebSocket client will refuse: a fragment, a port out of range
    except ValueError as error:
        raise BadStreamURL(f"the stream URL is not a WebSocket URL: {error}") from None
    return template


def fill(template: str, call_id: str, role: str) -> str:
    return template.replace("{call_id}", call_id).replace("{role}", role)


def check_fields(value: object, what: str) -> dict[str, str]:
    """A JSON object of strings (custom parameters, headers), bounded; else L{BadStreamField}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadStreamField(what, f"{what} must be an object of strings")
    if len(value) > MAX_FIELDS or any(len(k) + len(v) > MAX_FIELD_BYTES for k, v in value.items()):
        raise BadStreamField(what, f"{what}: at most {MAX_FIELDS}, each under {MAX_FIELD_BYTES} bytes")
    return dict(value)


def check_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers a stream's handshake may carry: token names, each once in any case, values without controls."""
    seen: set[str] = set()
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED:
            raise BadStreamField("headers", f"{name!r} is not a header a stream may set")
        if name.lower() in seen:
            raise BadStreamField("headers", f"{name} is given twice (header names are case-insensitive)")
        seen.add(name.lower())
        if _CONTROL.search(value):
            raise BadStreamField("headers", f"the value of {name} holds a control character")
    return headers


def parse_header(text: str) -> tuple[str, str]:
    """C{"NAME: VALUE"}, as --stream-header takes it; a ValueError (L{BadStreamField} among them) if not."""
    name, colon, value = text.partition(":")
    if not colon:
        raise ValueError("a header is NAME: VALUE")
    check_headers({name.strip(): value.strip()})
    return name.strip(), value.strip()


@implementer(ILegObserver, IStreamObserver)
class Streams(Part, LegObserver):
    """Every media stream of this instance: opened for legs, counted, stopped with the server."""

    name = "streams"
    log = Logger()

    def __init__(
        self, config: StreamConfig, reactor: IReactor, *, metrics: CollectorRegistry | None = None,
        webhooks: Webhooks | None = None, relay: Relay | None = None,
    ) -> None:
        from audiohangup.webhooks import sign, trust_root

        self.config = config
        self.reactor = reactor
        self.webhooks = webhooks
        #: Reads the streams' sockets with the legs' (plain TCP only), not the reactor.
        self.relay = relay
        self._sign = sign
        self._trust = None if config.ca is None else trust_root(config.ca)
        #: Streams not over yet (connecting, open, or closing), by id.
        self.current: dict[str, MediaStream] = {}
        #: What ended streams counted, kept for the metrics.
        self.ended_totals = Counts()
        self._allOver: list[Deferred[None]] = []
        metrics = metrics if metrics is not None else CollectorRegistry()  # none given: counted for nobody
        self.streams_total = series(
            metrics, Counter, "audiohangup_streams",
            "Media streams over, by protocol and outcome (ended, app_closed, failed).", ["protocol", "outcome"],
        )
        metrics.register(StreamTotals(self))  # active streams and their frames, read at scrape time

    # Opening

    def open(
        self,
        leg: IServerLeg,
        url: str,
        *,
        protocol: str | None = None,
        mode: str | None = None,
        parameters: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> MediaStream:
        """Open a stream for a live leg; a L{StreamRefused} says why one cannot be opened."""
        protocol, chosen = self.check(leg, url, protocol, mode)
        assert leg.call_id is not None
        config = self.config
        target = fill(url, leg.call_id, str(leg.role))
        stream_id = "MZ" + uuid.uuid4().hex
        stream_protocol: IStreamProtocol
        if protocol == "twilio":
            # The leg's role travels with the parameters, in Twilio's customParameters.
            custom = {"role": str(leg.role), **(parameters or {})}
            stream_protocol = TwilioProtocol(stream_id, leg.call_id, leg.format, custom, self.reactor)
        else:
            stream_protocol = AudiohangupProtocol(stream_id, leg.call_id, str(leg.role), leg.format, parameters or {})
        stream = MediaStream(
            leg, stream_id, target, redact(target), stream_protocol, chosen, config.settings, self
        )
        leg.addStream(stream)
        leg.addTap(stream)
        self.current[stream_id] = stream
        self.log.info(
            "{call_id} {role} stream {stream_id} to {url} connecting ({protocol}, {mode})",
            call_id=leg.call_id, role=leg.role, stream_id=stream_id, url=stream.public_url,
            protocol=protocol, mode=chosen,
        )
        try:
            client.connect(
                stream, self.reactor, headers=self._handshakeHeaders(target, headers or {}),
                timeout=config.connect_timeout, max_unsent_ms=config.max_unsent_ms, trust_root=self._trust,
                relay=self.relay,
            )
        except Exception as error:
            # Not a stream left connecting for ever (it would hold the leg's
            # converse slot): failed, with the reason, like an app that is down.
            # Its message may quote the URL, whose query or fragment can hold a token: only its type.
            stream.connectFailed(f"the WebSocket client refused the URL ({type(error).__name__})")
        return stream

    def check(self, leg: IServerLeg, url: str, protocol: str | None, mode: str | None) -> tuple[str, Mode]:
        """What L{open} checks first, so that a request for several legs opens all or none."""
        protocol = protocol or self.config.protocol
        if protocol not in PROTOCOLS:
            raise BadStreamField("protocol", f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        try:
            chosen = Mode(mode or self.config.mode)
        except ValueError:
            raise BadStreamField("mode", f"mode must be one of {', '.join(MODES)}, not {mode!r}") from None
        check_url(url)
        if not leg.live or leg.call_id is None:
            raise LegNotLive(f"the {leg.role} leg is not live")
        if len(leg.streams) >= MAX_STREAMS_PER_LEG:
            raise TooManyStreams(f"a leg has at most {MAX_STREAMS_PER_LEG} streams in its life")
        if chosen is Mode.CONVERSE and any(
            isinstance(s, MediaStream) and s.live and s.mode is Mode.CONVERSE for s in leg.streams
        ):
            raise AlreadyConversing(f"the {leg.role} leg has a converse stream already")
        return protocol, chosen

    def check_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """
        A request's headers for its streams (L{check_headers}), none of them
        one the configuration sets (--stream-header), in any case: refused,
        not merged, so that neither replaces the other unseen (an API caller
        cannot swap the operator's credential, and is told its own would not
        be sent).
        """
        check_headers(headers)
        configured = {name.lower() for name, _ in self.config.headers}
        for name in headers:
            if name.lower() in configured:
                raise BadStreamField("headers", f"{name} is set by the server's configuration (--stream-header)")
        return headers

    def _handshakeHeaders(self, url: str, extra: dict[str, str]) -> dict[str, str]:
        headers = {**dict(self.config.headers), **extra}
        if self.config.secret is not None:
            stamp = int(self.reactor.seconds())
            headers[TIMESTAMP_HEADER] = str(stamp)
            headers[SIGNATURE_HEADER] = self._sign(self.config.secret, url.encode("utf-8"), stamp)
        return headers

    # Finding and ending

    def find(self, call_id: str, stream_id: str) -> MediaStream | None:
        stream = self.current.get(stream_id)
        return stream if stream is not None and stream.leg.call_id == call_id else None

    def of(self, legs: Iterable[IServerLeg]) -> list[MediaStream]:
        return [s for leg in legs for s in leg.streams if isinstance(s, MediaStream)]

    async def stop(self) -> None:
        """At shutdown: every stream ends, and gets its closing handshake, bounded."""
        for stream in list(self.current.values()):
            stream.stop("the server is stopping")
        if not self.current:
            return
        over: Deferred[None] = Deferred()
        self._allOver.append(over)
        if not await within(over, client.CLOSE_GRACE + 1.0, self.reactor):
            self.log.warn("{count} media streams did not close in time", count=len(self.current))

    # ILegObserver

    def legStarted(self, leg: IServerLeg) -> None:
        if self.config.url is None or leg.role not in self.config.roles:
            return
        try:
            self.open(leg, self.config.url)
        except StreamRefused as error:
            self.log.warn("{call_id} {role} stream not opened: {why}", call_id=leg.call_id, role=leg.role, why=str(error))

    def legEnded(self, leg: IServerLeg) -> None:
        for stream in self.of([leg]):
            stream.stop("the leg ended")

    # IStreamObserver

    def streamStarted(self, stream: MediaStream) -> None:
        self._tell("stream.started", stream)

    def streamEnded(self, stream: MediaStream) -> None:
        self.current.pop(stream.stream_id, None)
        self.ended_totals.add(stream.totals())
        if not self.current:
            waiting, self._allOver = self._allOver, []
            for over in waiting:
                over.callback(None)
        self.streams_total.labels(protocol=stream.protocol.name, outcome=str(stream.outcome)).inc()
        self._tell("stream.failed" if stream.outcome is Outcome.FAILED else "stream.ended", stream)

    def _tell(self, event: str, stream: MediaStream) -> None:
        if self.webhooks is None or stream.leg.call_id is None:
            return
        fields: dict[str, Any] = {"stream": stream.record()}
        if stream.outcome is not None:
            fields["reason"] = stream.reason
        self.webhooks.event(event, stream.leg.call_id, str(stream.leg.role), fields)
