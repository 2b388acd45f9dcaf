# -*- test-case-name: tests.test_listen -*-
"""
Listen-in: a person hears a live call in the browser, through a WebSocket
on the API's own port (L{audiohangup.http.listen} is its Twisted side).

Like a C{listen}-mode media stream, a listener is a tap on the leg (it
hears every frame the party sends, after the flow has it) and never
speaks: nothing it sends reaches the call. It is bounded like a stream: a
browser that leaves more than C{--stream-max-unsent-ms} of audio unsent is
dropped (C{slow_listener}); the call goes on.

Getting in takes two steps, because a browser cannot put an C{Authorization}
header on a WebSocket: C{POST /calls/ID/listen} with a C{listen} (or
C{control}) token answers a ticket, good once, for L{TICKET_SECONDS}, for
that call and role; the WebSocket's C{GET} carries it. So the token never
goes into a URL (or a proxy's log), and a page of another site, which can
open a WebSocket to us but cannot get a ticket, hears nothing.

What the browser gets: a text message C{{"event": "start", ...}} naming the
channels (role and sample rate), then binary messages of 20 ms: one byte,
the channel's index, one zero byte, then the samples as signed 16-bit
little-endian PCM (G.711 legs decoded), then C{{"event": "stop", "reason"}}
and a close when the leg ends. No sockets here: the WebSocket is an
L{IListenSocket}, so every rule is tested without one.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.logger import Logger
from zope.interface import Interface, implementer

from audiohangup.codecs import decode
from audiohangup.events import LegObserver
from audiohangup.interfaces import ILegObserver, ILegTap, IServerLeg
from audiohangup.metrics import series
from audiohangup.reasons import Role, StrEnum
from audiohangup.wire import Frame

#: How long a ticket is good for: the page uses it at once.
TICKET_SECONDS = 10.0
#: Tickets not used yet, kept at most (the oldest go first): each is a few dozen bytes.
MAX_TICKETS = 256
#: Listeners at once on this instance: each costs a copy of its legs' audio, every 20 ms.
MAX_LISTENERS = 32

#: RFC 6455 close codes.
NORMAL_CLOSURE = 1000


class Result(StrEnum):
    """How a listen-in ended (or why none began), as the metrics count it."""

    CLOSED = "closed"  # the browser closed it (the tab, the stop button)
    LEG_ENDED = "leg_ended"  # every leg it heard ended
    SLOW = "slow_listener"  # the browser did not keep up
    FAILED = "failed"  # the connection went without a close, or the handshake failed
    REFUSED = "refused"  # no ticket: a token without the listen scope, or a bad ticket


@dataclass(frozen=True)
class Grant:
    """What a ticket lets its holder hear, who asked (for the log), and from where (the only source it is good from)."""

    call_id: str
    role: Role | None
    who: str
    expires: float
    source: str | None = None


class Tickets:
    """Single-use tickets, each for one call (and role), good for L{TICKET_SECONDS}; bounded in number."""

    def __init__(self, seconds: float = TICKET_SECONDS, limit: int = MAX_TICKETS) -> None:
        self.seconds = seconds
        self.limit = limit
        self._grants: OrderedDict[str, Grant] = OrderedDict()

    def __len__(self) -> int:
        return len(self._grants)

    def issue(self, call_id: str, role: Role | None, who: str, now: float, source: str | None = None) -> str:
        self._expire(now)
        while len(self._grants) >= self.limit:
            self._grants.popitem(last=False)
        ticket = secrets.token_urlsafe(24)
        self._grants[ticket] = Grant(call_id, role, who, now + self.seconds, source)
        return ticket

    def take(self, ticket: str, call_id: str, now: float, source: str | None = None) -> Grant | None:
        """The grant of C{ticket} if it is for C{call_id}, from its source, and not expired; used up either way."""
        self._expire(now)
        grant = self._grants.pop(ticket, None)
        if grant is None or grant.call_id != call_id or grant.source != source:
            return None
        return grant

    def _expire(self, now: float) -> None:
        while self._grants:
            ticket, grant = next(iter(self._grants.items()))
            if grant.expires > now:
                return
            del self._grants[ticket]


class IListenSocket(Interface):
    """The open WebSocket to the browser, as the adapter provides it."""

    def send(data: bytes, binary: bool) -> None:
        """Send one message; the adapter bounds what waits unsent, and drops a slow browser itself."""

    def close(code: int, reason: str) -> None:
        """Start the closing handshake; the adapter reports the end with L{Listener.closed}."""


@implementer(ILegTap)
class _Channel:
    """One leg heard by a listener: its frames, decoded, tagged with the channel's index."""

    def __init__(self, listener: Listener, index: int, leg: IServerLeg) -> None:
        self.listener = listener
        self.leg = leg
        self.format = leg.format
        self.tag = bytes([index, 0])

    def legAudio(self, frame: Frame) -> None:
        socket = self.listener.socket
        payload = frame.payload
        if socket is None or (self.format.sample_bytes == 2 and len(payload) % 2):
            return  # not open yet; or half a sample, which the leg's own checks log
        data = self.tag + decode(payload, self.format)
        socket.send(data, True)
        self.listener.frames += 1
        self.listener.bytes += len(data)

    def legDtmf(self, digit: str) -> None:
        pass

    def legHeard(self, data: bytes) -> None:
        pass


class IListenObserver(Interface):
    """Told when a listener ends (the manager: its bookkeeping and metrics)."""

    def listenEnded(listener: Listener) -> None:
        """The listener is over; C{listener.result} and C{listener.reason} say how."""


class Listener:
    """One browser hearing one or two legs of a call."""

    log = Logger()

    def __init__(
        self, listen_id: str, grant: Grant, legs: list[IServerLeg], source: str, observer: IListenObserver
    ) -> None:
        self.listen_id = listen_id
        self.grant = grant
        self.source = source
        self.observer = observer
        self.channels = [_Channel(self, index, leg) for index, leg in enumerate(legs)]
        self.socket: IListenSocket | None = None
        self.result: Result | None = None
        self.reason = ""
        self.frames = 0
        self.bytes = 0

    @property
    def live(self) -> bool:
        return self.result is None

    def _fields(self) -> dict[str, Any]:
        return {
            "call_id": self.grant.call_id, "listen_id": self.listen_id, "who": self.grant.who,
            "source": self.source, "roles": "+".join(str(channel.leg.role) for channel in self.channels),
        }

    def start(self) -> dict[str, Any]:
        """The opening message: what the binary messages carry."""
        return {
            "event": "start", "listen_id": self.listen_id, "call_id": self.grant.call_id,
            "encoding": "L16", "frame_ms": 20,
            "channels": [{"role": str(c.leg.role), "rate": c.format.rate} for c in self.channels],
        }

    # From the adapter

    def opened(self, socket: IListenSocket) -> None:
        """The WebSocket is open: the taps go on the legs that are still live."""
        if not self.live:
            socket.close(NORMAL_CLOSURE, self.reason)  # its legs ended during the handshake
            return
        self.socket = socket
        socket.send(json.dumps(self.start()).encode(), False)
        for channel in self.channels:
            if channel.leg.live:
                channel.leg.addTap(channel)
        self.log.info("{call_id} listen-in {listen_id} ({roles}) open for {who} from {source}", **self._fields())
        if not any(channel.leg.live for channel in self.channels):
            self.stop(Result.LEG_ENDED, "the leg ended")

    def closed(self, clean: bool, code: int | None) -> None:
        """The WebSocket is gone: the browser closed it, or the connection went."""
        if self.live:
            if clean:
                self._end(Result.CLOSED, f"the browser closed it (code {code})")
            else:
                self._end(Result.FAILED, "the connection went without a close")

    def slow(self, reason: str) -> None:
        """The adapter dropped a browser that did not keep up."""
        if self.live:
            self._end(Result.SLOW, reason)

    # From the legs

    def legEnded(self, leg: IServerLeg) -> None:
        mine = [channel for channel in self.channels if channel.leg is leg]
        if not mine or not self.live:
            return
        leg.removeTap(mine[0])
        if not any(channel.leg.live and channel.leg is not leg for channel in self.channels):
            self.stop(Result.LEG_ENDED, "the leg ended" if len(self.channels) == 1 else "the call's legs ended")

    def stop(self, result: Result, reason: str) -> None:
        """End it from our side: a stop message, then a close with code 1000."""
        if not self.live:
            return
        socket = self.socket
        self._end(result, reason)
        if socket is not None:
            socket.send(json.dumps({"event": "stop", "reason": reason}).encode(), False)
            socket.close(NORMAL_CLOSURE, reason)

    def _end(self, result: Result, reason: str) -> None:
        for channel in self.channels:
            channel.leg.removeTap(channel)
        self.result, self.reason = result, reason
        log = self.log.warn if result in (Result.SLOW, Result.FAILED) else self.log.info
        log(
            "{call_id} listen-in {listen_id} ({roles}) for {who} from {source} ended ({result}): {reason}; "
            "{frames} frames sent",
            result=result, reason=reason, frames=self.frames, **self._fields(),
        )
        self.observer.listenEnded(self)


class TooManyListeners(Exception):
    """This instance has L{MAX_LISTENERS} listeners already."""


@implementer(ILegObserver, IListenObserver)
class Listens(LegObserver):
    """Every listener of this instance, their tickets, and their metrics."""

    def __init__(
        self, max_unsent_ms: int, metrics: CollectorRegistry | None = None, *,
        tickets: Tickets | None = None, limit: int = MAX_LISTENERS,
    ) -> None:
        #: The bound on what may wait unsent for a browser: the streams' (--stream-max-unsent-ms).
        self.max_unsent_ms = max_unsent_ms
        self.tickets = tickets if tickets is not None else Tickets()
        self.limit = limit
        self.current: dict[str, Listener] = {}
        metrics = metrics if metrics is not None else CollectorRegistry()
        self.total = series(
            metrics, Counter, "audiohangup_listens",
            "Listen-ins over, or refused, by result (closed, leg_ended, slow_listener, failed, refused).",
            ["result"],
        )
        active = series(metrics, Gauge, "audiohangup_listens_active", "Listen-ins open now.")
        active.set_function(lambda: len(self.current))

    def refused(self) -> None:
        self.total.labels(result=Result.REFUSED.value).inc()

    def begin(self, grant: Grant, legs: list[IServerLeg], source: str) -> Listener:
        """A listener for a ticket just taken, waiting for its WebSocket to open."""
        if len(self.current) >= self.limit:
            self.refused()
            raise TooManyListeners(f"this instance has {self.limit} listen-ins open already")
        listener = Listener("LI" + uuid.uuid4().hex, grant, legs, source, self)
        self.current[listener.listen_id] = listener
        return listener

    # IListenObserver

    def listenEnded(self, listener: Listener) -> None:
        self.current.pop(listener.listen_id, None)
        self.total.labels(result=str(listener.result)).inc()

    # ILegObserver

    def legEnded(self, leg: IServerLeg) -> None:
        for listener in list(self.current.values()):
            listener.legEnded(leg)
