# -*- test-case-name: tests.test_webhooks,tests.test_webhook_outbox -*-
"""
Leg events POSTed to webhook receivers, one JSON object per event.

Each event is a JSON object, its body the compact, key-sorted encoding::

    {"at": "2025-01-01T12:00:00.000+00:00", "call_id": "6f5c...", "event": "leg_ended",
     "event_id": "9b1e...", "reason": "hangup_reset", "cause": "api", "role": "visitor"}

C{event} is C{leg_started}, C{leg_ended} (which adds C{reason} and C{cause},
C{null} when we sent no hangup) or C{call_ended} (the last leg of the call id
is gone; its C{role} is C{null}). C{event_id} is unique per event and the same
for every receiver and every attempt, so receivers can de-duplicate retries.
Each request carries C{X-Audiohangup-Event}, C{X-Audiohangup-Event-Id} and,
with a secret, C{X-Audiohangup-Timestamp: <unix seconds>} and
C{X-Audiohangup-Signature: t=<unix seconds>,sha256=<hex HMAC-SHA256 of
"<t>.<body>">}, made anew for each attempt: L{verify} checks one, and refuses
a timestamp more than its tolerance (300 s) away from now, so a captured
request cannot be replayed later.

HTTPS receivers' certificates are verified against the system's trust store,
or against C{--webhook-ca}'s certificates instead; one that cannot be
verified is a failed attempt, logged with the reason.

Delivery never blocks or fails a call: the observer methods only enqueue. One
queue per (URL, call id) keeps each call's events in order for each receiver,
while different calls are delivered concurrently (bounded). A 2xx is
C{delivered}; another 4xx than 408/429 (or a 1xx/3xx) is C{rejected} and not
retried; a connection error, a timeout, a 5xx, 408 or 429 is retried with
exponential backoff (C{retried}) up to C{max_attempts} attempts, then dropped
(C{failed}). A response whose head passes 64 KiB or 100 lines is a failed
attempt too, its connection aborted (L{audiohangup.httpclient}). Events beyond C{max_queue} held at once are dropped
(C{overflow}). Drops are logged at warn, at most about once per
L{LOG_INTERVAL} per kind, with a count of the ones not logged.

With an L{Outbox} (the server's default), every event is written to it, on
its own thread, before its first attempt, and deleted once delivered,
rejected or dropped; at start-up the events an earlier run left are sent
again, first, in the order they were written. Events left undelivered at
stop stay there for the next start. Attempts do not run out (C{max_attempts}
C{None}): the bound is the outbox's C{max_events}, and at it the I{oldest}
event is dropped (C{overflow}), not the new one. A receiver may therefore
see an event twice (a crash between its answer and the delete), never with
another C{event_id}. Two processes may share one outbox (an upgrade: the old
one draining, the new one started): every L{ADOPT_INTERVAL} each adopts the
rows older than L{ADOPT_GRACE} that it does not hold (the other stopped or
was killed before delivering them, or cannot deliver them either), within
its bound, queued in the order they were written. If the outbox cannot be opened or written, that is
logged at error level and counted (C{audiohangup_webhook_outbox_errors_total}),
and the events go on in memory: calls are never held up by it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import treq
from hyperlink import EncodedURL
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from audiohangup import __version__
from audiohangup.events import LegObserver, counts_as_leg
from audiohangup.httpclient import BoundedPool
from audiohangup.interfaces import ILegObserver
from audiohangup.lifecycle import Once
from audiohangup.logs import LogLimit, WarningCount, iso_time, redact
from audiohangup.metrics import OnScrape, series
from audiohangup.outbox import Outbox, Stored, receiver_key

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # Twisted exports no name for it

    from audiohangup.interfaces import IServerLeg

EVENT_HEADER = "X-Audiohangup-Event"
EVENT_ID_HEADER = "X-Audiohangup-Event-Id"
SIGNATURE_HEADER = "X-Audiohangup-Signature"
TIMESTAMP_HEADER = "X-Audiohangup-Timestamp"

#: How far from now a signature's timestamp may be, by default, for L{verify}.
TOLERANCE = 300.0

#: Seconds between two warn lines about the same kind of drop.
LOG_INTERVAL = 10.0

#: Response bodies are read and discarded; past this many bytes the connection is closed.
MAX_RESPONSE_BYTES = 64 * 1024

#: Outcomes, as counted in C{audiohangup_webhook_deliveries_total}.
DELIVERED = "delivered"
RETRIED = "retried"
REJECTED = "rejected"
FAILED = "failed"
OVERFLOW = "overflow"

_RETRYABLE_STATUSES = frozenset({408, 429})

#: Seconds between two looks, while running, for events another process left in the outbox.
ADOPT_INTERVAL = 30.0

#: How old (since the event) a row not held by this process must be before it is adopted: well past a
#: first attempt and its first retries (5 s each), so another live process's events that go through are
#: not sent twice; a receiver down longer than that gets both processes' attempts (same event id).
ADOPT_GRACE = 60.0

_OUTBOX_ERRORS = "Webhook outbox statements that failed (open, write, delete): events then go on in memory only."


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """
    The signature header's value: C{t=<timestamp>,sha256=<hex>}, the HMAC-SHA256
    under C{secret} of the timestamp, a dot and C{body}.
    """
    return f"t={timestamp},sha256={_mac(secret, timestamp, body)}"


def verify(
    secret: str, body: bytes, header: str | bytes | None, *, tolerance: float = TOLERANCE, now: float | None = None
) -> bool:
    """
    Whether C{header} signs C{body} under C{secret} at a time no more than
    C{tolerance} seconds from C{now} (default: the system clock), the
    digests compared in constant time. A header in another form is False.
    """
    if header is None:
        return False
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            return False
    fields: dict[str, str] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields[name] = value
    try:
        timestamp = int(fields["t"])
        given = fields["sha256"].encode("ascii")
    except (KeyError, ValueError, UnicodeEncodeError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(_mac(secret, timestamp, body).encode("ascii"), given)


def trust_root(path: str) -> IOpenSSLTrustRoot:
    """
    The certificates of a PEM file, as a trust root for HTTPS: a private CA
    (or several). A ValueError says why a file cannot serve.
    """
    try:
        with open(path, "rb") as file:
            pem = file.read()
    except OSError as error:
        raise ValueError(f"{path}: cannot be read: {error.strerror or error}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    if not blocks:
        raise ValueError(f"{path}: holds no PEM certificate")
    try:
        root: IOpenSSLTrustRoot = trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])
        return root
    except Exception as error:  # pyOpenSSL raises its own error types for a bad certificate
        raise ValueError(f"{path}: a certificate does not load: {error}") from None


def _check_url(url: str) -> None:
    try:
        parsed = EncodedURL.from_text(url)
    except Exception as error:
        raise ValueError(f"webhook URL {url!r} does not parse: {error}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"webhook URL {url!r} must be http:// or https:// with a host")
    if parsed.userinfo:
        raise ValueError(f"webhook URL {redact(url)!r}: credentials in the URL are not supported")


@dataclass
class _Delivery:
    """One event for one URL."""

    event: str
    event_id: str
    call_id: str
    body: bytes
    attempts: int = 0
    #: When the event happened (reactor time): the backlog's age is the oldest one's.
    created_at: float = 0.0
    #: Its row in the outbox, once written there (None: in memory only).
    rowid: int | None = None
    #: Its place among the events held, oldest first (given by L{Webhooks._enqueue}).
    seq: int = 0


class _Queue:
    """
    The events of one call id for one URL, delivered one at a time, in order.

    C{state} is C{ready} (waiting for a request slot), C{sending} (a request
    in flight) or C{waiting} (a retry is scheduled).
    """

    def __init__(self, url: str, call_id: str) -> None:
        self.url = url
        self.call_id = call_id
        self.items: deque[_Delivery] = deque()
        self.state = "ready"
        self.request: Deferred[Any] | None = None
        self.retry: IDelayedCall | None = None


class _Drain(Protocol):
    """Reads a response body and discards it, so the connection can go back to the pool."""

    def __init__(self) -> None:
        self.size = 0
        self.head = b""
        self.done: Deferred[None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.head) < 200:
            self.head += data[: 200 - len(self.head)]
        if self.size > MAX_RESPONSE_BYTES and not self.done.called:
            self._cancel(self.done)
            self.done.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(None)

    def _cancel(self, done: Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class _Backlog(OnScrape):
    """
    What the webhooks have not delivered yet, read at scrape time: events
    held (one per event and receiver: the outbox's rows, or the memory
    queue's with no outbox) and the age of the oldest, for alerts on a
    receiver that is down or too slow. Every sender of one registry is summed.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.senders: weakref.WeakSet[Webhooks] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        senders = list(self.senders)
        events = GaugeMetricFamily(
            "audiohangup_webhook_outbox_events",
            "Webhook events not delivered yet, one per event and receiver (in the outbox; in memory without one).",
        )
        events.add_metric([], sum(sender.pending for sender in senders))
        yield events
        oldest = [at for at in (sender.oldest_at for sender in senders) if at is not None]
        age = GaugeMetricFamily(
            "audiohangup_webhook_outbox_oldest_age_seconds",
            "Seconds since the oldest undelivered webhook event happened; 0 with none.",
        )
        age.add_metric([], max(0.0, self.clock.seconds() - min(oldest)) if oldest else 0.0)
        yield age


#: The backlog collector of each registry: one, however many senders count in it.
_backlogs: weakref.WeakKeyDictionary[CollectorRegistry, _Backlog] = weakref.WeakKeyDictionary()


def _backlog(metrics: CollectorRegistry, clock: Any) -> _Backlog:
    found = _backlogs.get(metrics)
    if found is None:
        found = _backlogs[metrics] = _Backlog(clock)
        metrics.register(found)
    return found


@implementer(ILegObserver)
class Webhooks(Service, LegObserver):
    """
    Posts leg events to every URL in C{urls}; stopping the service is L{stop}.

    @param reactor: the reactor for requests, timeouts and retries.
    @param secret: signs each body (C{X-Audiohangup-Signature}) when given.
    @param ca: a PEM file of the certificates HTTPS receivers are verified
        against, instead of the system's trust store.
    @param metrics: where each outcome is counted.
    @param timeout: seconds for one attempt, from connecting to the end of the
        response body; also how long L{stop} waits.
    @param max_attempts: attempts per event and URL, the first one included;
        C{None}: no limit (with an outbox, whose bound limits instead).
    @param backoff: seconds before the first retry, doubled for each next one.
    @param max_backoff: the longest wait between two attempts.
    @param max_queue: events held at once (queued, in flight or waiting for a
        retry; an event counts once per URL); beyond it new events are dropped.
    @param pool: an C{HTTPConnectionPool} to use (and not close); by default
        a L{BoundedPool} of our own (receivers' response heads bounded),
        closed by L{stop}.
    @param max_concurrent: requests in flight at once, over every URL.
    @param outbox: where every event is kept until it is done with, so a
        crash or a restart loses none; opened by C{startService}, closed by
        L{stop}. With it, C{max_queue} is its C{max_events}, and at the bound
        the oldest event is dropped.
    @param adopt_interval: seconds between two looks for another process's
        rows in the outbox (L{adopt}).
    @param adopt_grace: how old a row must be to be adopted.
    @param clock: what times the adoption (default: C{reactor}); events'
        times are the reactor's, so both must tell the same time.
    """

    log = Logger()
    name = "webhooks"

    @staticmethod
    def counter(metrics: CollectorRegistry, clock: Any) -> Counter:
        """
        The deliveries' series in C{metrics}, and the backlog's (its age read
        on C{clock}): declared (no sample yet, or 0) even without --webhook.
        """
        _backlog(metrics, clock)
        series(metrics, Counter, "audiohangup_webhook_outbox_errors", _OUTBOX_ERRORS)
        return series(metrics, Counter, "audiohangup_webhook_deliveries", "Webhook deliveries, by outcome.", ["outcome"])

    @staticmethod
    def check(urls: list[str], *, secret: str | None = None) -> None:
        """Raise C{ValueError} naming what is wrong with these URLs or this secret."""
        for url in urls:
            _check_url(url)
        if secret is not None and not secret:
            raise ValueError("the webhook secret is empty")

    def __init__(
        self,
        urls: list[str],
        reactor: Any,
        *,
        secret: str | None = None,
        metrics: CollectorRegistry | None = None,
        timeout: float = 5.0,
        max_attempts: int | None = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_queue: int = 10000,
        pool: HTTPConnectionPool | None = None,
        max_concurrent: int = 20,
        ca: str | None = None,
        outbox: Outbox | None = None,
        adopt_interval: float = ADOPT_INTERVAL,
        adopt_grace: float = ADOPT_GRACE,
        clock: Any = None,
    ) -> None:
        self.check(urls, secret=secret)
        if timeout <= 0:
            raise ValueError("the webhook timeout must be positive")
        if (max_attempts is not None and max_attempts < 1) or max_queue < 1 or max_concurrent < 1:
            raise ValueError("max_attempts, max_queue and max_concurrent must be at least 1")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must not be negative")
        self.urls = list(urls)
        self.reactor = reactor
        self.secret = secret
        metrics = metrics if metrics is not None else CollectorRegistry()  # none given: for nobody
        self.deliveries = self.counter(metrics, reactor)
        self.outbox_errors = series(metrics, Counter, "audiohangup_webhook_outbox_errors", _OUTBOX_ERRORS)
        _backlog(metrics, reactor).senders.add(self)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.outbox = outbox
        #: Whether events go to the outbox: off when it failed to open.
        self._durable = outbox is not None
        self.max_queue = max_queue if outbox is None else outbox.max_events
        self.max_concurrent = max_concurrent
        self._owns_pool = pool is None
        if pool is None:
            pool = BoundedPool(reactor, persistent=True)
            pool.maxPersistentPerHost = max_concurrent
        self.pool = pool
        policy = BrowserLikePolicyForHTTPS(trustRoot=None if ca is None else trust_root(ca))
        self.agent = Agent(reactor, contextFactory=policy, pool=pool)
        self._names = {url: redact(url) for url in self.urls}
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._ready: deque[_Queue] = deque()
        self._active = 0
        self._held = 0
        #: Every event held, oldest first, by its seq: the bound drops from the front; the age gauge reads it.
        self._order: dict[int, tuple[_Queue, _Delivery]] = {}
        self._seq = itertools.count()
        self._storing = 0  # outbox writes not answered yet
        self._kept = 0  # left in the outbox at stop, for the next start
        self._error_limit = LogLimit(LOG_INTERVAL)
        self._pumping = False
        self._accepting = True
        self._giving_up = False
        self._stop_dropped = 0
        self._deadline: IDelayedCall | None = None
        self._stopped = False  # nothing is left to deliver
        self._stopping = Once()  # done once the pool is closed too
        #: Outbox rows this process holds or has not seen deleted yet: never adopted.
        self._mine: set[int] = set()
        self.adopt_grace = adopt_grace
        self._adopting = LoopingCall(self.adopt)
        self._adopting.clock = reactor if clock is None else clock
        self._adopt_interval = adopt_interval
        self._throttles = {
            OVERFLOW: WarningCount(
                self.log, reactor, "{count} more webhook events dropped, queue full, in the last {interval:g} s",
                LOG_INTERVAL,
            ),
            "outbox-full": WarningCount(
                self.log, reactor,
                "{count} more oldest webhook events dropped from the full outbox in the last {interval:g} s",
                LOG_INTERVAL,
            ),
            FAILED: WarningCount(
                self.log, reactor,
                "{count} more webhook events dropped after failed attempts in the last {interval:g} s", LOG_INTERVAL,
            ),
            REJECTED: WarningCount(
                self.log, reactor, "{count} more webhook events rejected by their receiver in the last {interval:g} s",
                LOG_INTERVAL,
            ),
        }

    def retarget(self, urls: list[str], secret: str | None) -> None:
        """
        New events go to these URLs, signed with this secret (SIGHUP with
        --config); those already queued keep the URL they were queued for.
        """
        self.check(urls, secret=secret)
        self.urls, self.secret = list(urls), secret
        self._names.update((url, redact(url)) for url in self.urls)

    @property
    def pending(self) -> int:
        """Events queued, in flight or waiting for a retry (one per event and URL)."""
        return self._held

    @property
    def oldest_at(self) -> float | None:
        """When the oldest event held happened (reactor time), or None."""
        for _, item in self._order.values():
            return item.created_at
        return None

    # The outbox

    def startService(self) -> None:
        """
        Open the outbox, before the reactor runs: the events of the first
        legs are written behind the opening, so what an earlier run left is
        sent first, in its order.
        """
        super().startService()
        if self.outbox is not None:
            self.outbox.open().addCallbacks(self._reload, self._openFailed)

    def _openFailed(self, failure: Failure) -> None:
        assert self.outbox is not None
        self._durable = False
        self.outbox_errors.inc()
        self.log.error(
            "webhook outbox {path} is off: {error}; webhook events are kept in memory only, "
            "and lost by a crash or a restart",
            path=self.outbox.path, error=_text(failure),
        )

    def _reload(self, rows: list[Stored]) -> None:
        """Queue again, oldest first, what an earlier run left: for receivers still configured, within the bound."""
        assert self.outbox is not None
        urls = {receiver_key(url): url for url in self.urls}
        known = [row for row in rows if row.receiver in urls]
        forgotten = [row.rowid for row in rows if row.receiver not in urls]
        excess = max(0, len(known) - self.max_queue)
        for row in known[:excess]:
            forgotten.append(row.rowid)
            self._count(OVERFLOW)
        self.log.info(
            "webhook outbox {path}: {count} undelivered events from an earlier run",
            path=self.outbox.path, count=len(known) - excess,
        )
        if len(forgotten) > excess:
            self.log.warn(
                "webhook outbox {path}: {count} events for receivers no longer configured dropped",
                path=self.outbox.path, count=len(forgotten) - excess,
            )
        if excess:
            self.log.warn(
                "webhook outbox {path}: the oldest {count} events dropped, beyond its bound of {max_events}",
                path=self.outbox.path, count=excess, max_events=self.max_queue,
            )
        if self._stopping.begun:
            return  # stopped before it opened (the outbox is closing): they stay for the next start
        if forgotten:
            self._delete(forgotten, "-")
        for row in known[excess:]:
            item = _Delivery(row.event, row.event_id, row.call_id, row.body, created_at=row.created_at, rowid=row.rowid)
            self._mine.add(row.rowid)
            self._enqueue(urls[row.receiver], item)
        if self._durable:
            self._adopting.start(self._adopt_interval, now=False).addErrback(self._bug, None)

    def adopt(self) -> Deferred[int]:
        """
        Queue the outbox's rows for our receivers that are older than
        C{adopt_grace} and that we do not hold: another process's on the
        same file (an upgrade's old one, stopped or killed before it
        delivered them), within the bound, in the order they were written.
        Fires with how many (never fails: an error is logged and counted).
        Called every C{adopt_interval} seconds once the outbox is open.
        """
        room = self.max_queue - self._held - self._storing
        if self.outbox is None or not self._durable or not self._accepting or room < 1:
            return succeed(0)
        urls = {receiver_key(url): url for url in self.urls}
        before = self._adopting.clock.seconds() - self.adopt_grace
        found = self.outbox.orphans(list(urls), before, frozenset(self._mine), room)
        return found.addCallbacks(self._adopted, self._adoptFailed, callbackArgs=(urls,))

    def _adoptFailed(self, failure: Failure) -> int:
        self._outboxFailed(failure, "adopt", "-")
        return 0

    def _adopted(self, rows: list[Stored], urls: dict[str, str]) -> int:
        if not self._accepting:
            return 0  # stopping: they stay for the next start
        room = self.max_queue - self._held
        rows = [row for row in rows if row.rowid not in self._mine and row.receiver in urls][:max(0, room)]
        adopted: dict[int, tuple[_Queue, _Delivery]] = {}
        for row in rows:
            self._mine.add(row.rowid)
            item = _Delivery(row.event, row.event_id, row.call_id, row.body, created_at=row.created_at, rowid=row.rowid)
            entry = self._insert(urls[row.receiver], item)
            adopted[item.seq] = entry
        if rows:
            # Held first: older than the grace, they are about the oldest (for the bound and the age gauge);
            # a merge, not a sort, which would hold the reactor ~40 ms at 50 000 events.
            self._order = {**adopted, **self._order}
            assert self.outbox is not None
            self.log.info(
                "webhook outbox {path}: {count} undelivered events adopted, left by another process "
                "(stopped, or not delivering them for {grace:g} s)",
                path=self.outbox.path, count=len(rows), grace=self.adopt_grace,
            )
            self._pump()
        return len(rows)

    def _store(self, url: str, item: _Delivery) -> None:
        """Write the event to the outbox; queue it once written (in the order written), or in memory if that failed."""
        assert self.outbox is not None
        self._storing += 1
        stored = self.outbox.add(receiver_key(url), item.call_id, item.event, item.event_id, item.body, item.created_at)
        stored.addBoth(self._stored, url, item).addErrback(self._bug, None)

    def _stored(self, result: int | Failure, url: str, item: _Delivery) -> None:
        self._storing -= 1
        if isinstance(result, Failure):
            self._outboxFailed(result, "write", item.call_id)
        else:
            item.rowid = result
            self._mine.add(result)
        if self._giving_up:  # stopping, past the deadline
            if item.rowid is not None:
                self._kept += 1
            else:
                self._stop_dropped += 1
            self._checkStopped()
            return
        self._enqueue(url, item)
        self._checkStopped()

    def _delete(self, rowids: list[int], call_id: str) -> None:
        if rowids and self.outbox is not None and self._durable:
            deleted = self.outbox.delete(rowids).addErrback(self._outboxFailed, "delete", call_id)
            # Forgotten once gone from the file (or not: then adopted again, at least once), not before.
            deleted.addBoth(lambda _: self._mine.difference_update(rowids))

    def _outboxFailed(self, failure: Failure, what: str, call_id: str) -> None:
        """A failed outbox statement: counted, and logged at error at most once an interval."""
        self.outbox_errors.inc()
        if self._error_limit("outbox", self.reactor.seconds()):
            assert self.outbox is not None
            self.log.error(
                "{call_id} webhook outbox {path}: {what} failed: {error}; the event goes on in memory only"
                if what == "write" else "{call_id} webhook outbox {path}: {what} failed: {error}",
                call_id=call_id, path=self.outbox.path, what=what, error=_text(failure),
            )

    # ILegObserver: these only enqueue, and never raise.

    # A hangup sent is not an event receivers are told of: leg_ended carries its cause.

    def legStarted(self, leg: IServerLeg) -> None:
        self._event("leg_started", leg)

    def legEnded(self, leg: IServerLeg) -> None:
        self._event("leg_ended", leg)

    def callEnded(self, call_id: str) -> None:
        self._event("call_ended", None, call_id)

    def connectionEnded(self, connection: IServerLeg) -> None:
        """
        A connection without a UUID sends no event (no call id); one refused
        as a duplicate is a C{leg_ended} with its reason, and no C{leg_started}.
        """
        if counts_as_leg(connection):
            self._event("leg_ended", connection)

    def _event(self, event: str, leg: IServerLeg | None, call_id: str | None = None) -> None:
        fields: dict[str, Any] = {}
        role = None
        if leg is not None:
            call_id, role = leg.call_id, leg.role.value
            if event == "leg_ended":
                reason, cause = leg.close_reason, leg.hangup_cause
                fields["reason"] = None if reason is None else reason.value
                fields["cause"] = None if cause is None else cause.value
        if call_id is not None:  # else not a leg yet: nothing to tell
            self.event(event, call_id, role, fields)

    def event(self, event: str, call_id: str, role: str | None, fields: dict[str, Any]) -> None:
        """Queue one event for every URL, in its call's order; also for events other than legs' (streams)."""
        try:
            if not self._accepting or not self.urls:
                return
            payload: dict[str, Any] = {**fields, "event": event, "role": role}
            payload["event_id"] = event_id = uuid.uuid4().hex
            payload["call_id"] = call_id
            now = self.reactor.seconds()
            payload["at"] = iso_time(now)
            body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
            for url in self.urls:
                item = _Delivery(event, event_id, call_id, body, created_at=now)
                if self._durable:
                    self._store(url, item)
                else:
                    self._enqueue(url, item)
        except Exception:
            self.log.failure("{call_id} webhook event {event} could not be queued", call_id=call_id, event=event)

    # Queues

    def _count(self, outcome: str) -> None:
        self.deliveries.labels(outcome=outcome).inc()

    def _enqueue(self, url: str, item: _Delivery) -> None:
        if self._held >= self.max_queue and self.outbox is not None:
            self._dropOldest()
        if self._held >= self.max_queue:
            self._count(OVERFLOW)
            self._delete([item.rowid] if item.rowid is not None else [], item.call_id)
            self._throttles[OVERFLOW].warn(
                "{call_id} webhook {event} {event_id} for {url} dropped: "
                "{max_queue} events already queued (receivers too slow or down?)",
                call_id=item.call_id, event=item.event, event_id=item.event_id,
                url=self._names[url], max_queue=self.max_queue,
            )
            return
        self._held += 1
        item.seq = next(self._seq)
        queue = self._queueFor(url, item.call_id)
        queue.items.append(item)
        self._order[item.seq] = (queue, item)
        self._pump()

    def _queueFor(self, url: str, call_id: str) -> _Queue:
        """The queue of C{call_id}'s events for C{url}, made (and ready) if it has none."""
        queue = self._queues.get((url, call_id))
        if queue is None:
            queue = self._queues[url, call_id] = _Queue(url, call_id)
            self._ready.append(queue)
        return queue

    def _insert(self, url: str, item: _Delivery) -> tuple[_Queue, _Delivery]:
        """
        Queue an adopted event (room checked) before the events of its call
        written after it, but never before the one in flight.
        """
        assert item.rowid is not None
        self._held += 1
        item.seq = next(self._seq)
        queue = self._queueFor(url, item.call_id)
        at = len(queue.items)
        for index in range(1 if queue.state == "sending" else 0, len(queue.items)):
            rowid = queue.items[index].rowid
            if rowid is not None and rowid > item.rowid:
                at = index
                break
        queue.items.insert(at, item)
        return queue, item

    def _release(self, item: _Delivery, *, forget: bool = True) -> None:
        """The event is no longer held: delete it from the outbox too, unless it is kept there for the next start."""
        self._held -= 1
        self._order.pop(item.seq, None)
        if forget and item.rowid is not None:
            self._delete([item.rowid], item.call_id)

    def _dropOldest(self) -> None:
        """The outbox is full: drop its oldest event not in flight (counted, logged once an interval)."""
        for queue, item in self._order.values():
            if not (queue.state == "sending" and queue.items and queue.items[0] is item):
                break
        else:
            return  # every one in flight: the new event is dropped instead
        for index, queued in enumerate(queue.items):
            if queued is item:
                del queue.items[index]
                break
        if not queue.items:
            if queue.retry is not None and queue.retry.active():
                queue.retry.cancel()
            queue.retry = None
            if self._queues.get((queue.url, queue.call_id)) is queue:
                del self._queues[queue.url, queue.call_id]  # if still in _ready, _pump skips it
        self._release(item)
        self._count(OVERFLOW)
        self._throttles["outbox-full"].warn(
            "webhook outbox full ({max_queue} events; receivers too slow or down?): the oldest, "
            "{call_id} {event} {event_id} for {url}, dropped",
            call_id=item.call_id, event=item.event, event_id=item.event_id,
            url=self._names[queue.url], max_queue=self.max_queue,
        )

    def _pump(self) -> None:
        """Start requests while there are queues ready and free slots."""
        if self._pumping:
            return  # a request that settled at once; the loop below goes on
        self._pumping = True
        try:
            while self._ready and self._active < self.max_concurrent and not self._giving_up:
                queue = self._ready.popleft()
                if queue.items:  # else emptied by the bound
                    self._send(queue)
        finally:
            self._pumping = False

    def _send(self, queue: _Queue) -> None:
        item = queue.items[0]
        item.attempts += 1
        queue.state = "sending"
        self._active += 1
        headers: dict[bytes | str, bytes | str] = {
            "Content-Type": "application/json",
            "User-Agent": f"audiohangup/{__version__}",
            EVENT_HEADER: item.event,
            EVENT_ID_HEADER: item.event_id,
        }
        if self.secret is not None:
            timestamp = int(self.reactor.seconds())
            headers[TIMESTAMP_HEADER] = str(timestamp)
            headers[SIGNATURE_HEADER] = sign(self.secret, item.body, timestamp)
        request: Deferred[Any] = maybeDeferred(
            treq.post,
            queue.url,
            data=item.body,
            headers=headers,
            timeout=self.timeout,
            agent=self.agent,
            reactor=self.reactor,
            allow_redirects=False,
            unbuffered=True,
        )
        request.addCallback(self._readBody)
        queue.request = request
        # treq's timeout stops at the response headers; this one covers the body too.
        timer = self.reactor.callLater(self.timeout, request.cancel)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            queue.request = None
            self._active -= 1
            return result

        request.addBoth(settled)
        request.addCallbacks(
            self._answered, self._errored, callbackArgs=(queue, item), errbackArgs=(queue, item)
        )
        request.addErrback(self._bug, queue)

    def _readBody(self, response: Any) -> Deferred[tuple[int, bytes]]:
        drain = _Drain()
        response.deliverBody(drain)
        # The status decides; a body cut short (or cancelled) changes nothing.
        return drain.done.addBoth(lambda _: (response.code, drain.head))

    def _answered(self, answer: tuple[int, bytes], queue: _Queue, item: _Delivery) -> None:
        code, head = answer
        fields = self._fields(queue, item, status=code)
        if 200 <= code < 300:
            self.log.debug(
                "{call_id} webhook {event} {event_id} delivered to {url} ({status}, attempt {attempt})",
                **fields,
            )
            self._finish(queue, DELIVERED)
        elif code >= 500 or code in _RETRYABLE_STATUSES:
            self._failedAttempt(queue, item, f"HTTP {code}")
        else:
            self._throttles[REJECTED].warn(
                "{call_id} webhook {event} {event_id} rejected by {url}: HTTP {status} {answer!r}; not retried",
                answer=head.decode("utf-8", "replace")[:200], **fields,
            )
            self._finish(queue, REJECTED)

    def _errored(self, failure: Failure, queue: _Queue, item: _Delivery) -> None:
        self._failedAttempt(queue, item, self._describe(failure))

    def _describe(self, failure: Failure) -> str:
        if failure.check(ConnectingCancelledError):
            return f"could not connect within {self.timeout:g} s"
        if failure.check(CancelledError):
            return f"no answer within {self.timeout:g} s"
        reasons = getattr(failure.value, "reasons", None)  # ResponseFailed and kin wrap failures
        if reasons:
            inner = reasons[0]
            if isinstance(inner, Failure):
                if inner.check(CancelledError):
                    return f"no answer within {self.timeout:g} s"
                return f"{type(failure.value).__name__}: {type(inner.value).__name__}: {inner.getErrorMessage()}"
        return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"

    def _failedAttempt(self, queue: _Queue, item: _Delivery, why: str) -> None:
        fields = self._fields(queue, item, why=why)
        if not self._accepting:
            # Stopping: no retries; what fails now is dropped, or kept in the outbox for the next start.
            self.log.debug("{call_id} webhook {event} {event_id} to {url} failed while stopping: {why}", **fields)
            self._leave(queue)
            return
        if self.max_attempts is not None and item.attempts >= self.max_attempts:
            self._throttles[FAILED].warn(
                "{call_id} webhook {event} {event_id} to {url} dropped after {attempt} attempts: {why}",
                **fields,
            )
            self._finish(queue, FAILED)
            return
        delay = min(self.backoff * 2 ** min(item.attempts - 1, 64), self.max_backoff)
        self._count(RETRIED)
        self.log.debug(
            "{call_id} webhook {event} {event_id} to {url} attempt {attempt} failed: {why}; retry in {delay:g} s",
            delay=delay, **fields,
        )
        queue.state = "waiting"
        queue.retry = self.reactor.callLater(delay, self._retryNow, queue)
        self._pump()

    def _retryNow(self, queue: _Queue) -> None:
        queue.retry = None
        queue.state = "ready"
        self._ready.append(queue)
        self._pump()

    def _leave(self, queue: _Queue) -> None:
        """Stopping: the head event of C{queue} gets no more attempts; it stays in the outbox if it is there."""
        if queue.items[0].rowid is not None:
            self._kept += 1
            self._finish(queue, None)
        else:
            self._stop_dropped += 1
            self._finish(queue, FAILED)

    def _finish(self, queue: _Queue, outcome: str | None) -> None:
        """
        The head event of C{queue} is done with: delivered, rejected or
        dropped, and deleted from the outbox; or (C{outcome} None) left in
        the outbox at stop.
        """
        item = queue.items.popleft()
        self._release(item, forget=outcome is not None)
        if outcome is not None:
            self._count(outcome)
        if self._giving_up:
            self._dropAll(queue)
        elif queue.items:
            queue.state = "ready"
            self._ready.append(queue)
        else:
            del self._queues[queue.url, queue.call_id]
        self._pump()
        self._checkStopped()

    def _dropAll(self, queue: _Queue) -> None:
        """Stopping, past the deadline: forget every event of C{queue}."""
        if queue.retry is not None and queue.retry.active():
            queue.retry.cancel()
        queue.retry = None
        for item in queue.items:
            self._release(item, forget=False)
            if item.rowid is not None:
                self._kept += 1
            else:
                self._stop_dropped += 1
                self._count(FAILED)
        queue.items.clear()
        self._queues.pop((queue.url, queue.call_id), None)

    def _bug(self, failure: Failure, queue: _Queue | None) -> None:
        if queue is None:
            self.log.failure("webhook outbox: queueing an event failed unexpectedly", failure)
            return
        self.log.failure("{call_id} webhook delivery to {url} failed unexpectedly", failure,
                         call_id=queue.call_id, url=self._names[queue.url])

    def _fields(self, queue: _Queue, item: _Delivery, **extra: Any) -> dict[str, Any]:
        return dict(
            call_id=queue.call_id, event=item.event, event_id=item.event_id,
            url=self._names[queue.url], attempt=item.attempts, **extra,
        )

    # Stopping

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop()

    def stop(self) -> Deferred[None]:
        """
        Stop taking events and drain, bounded by C{timeout} seconds: queued
        events get one attempt each, scheduled retries are cancelled (their
        event dropped), and at the deadline requests still in flight are
        cancelled and what is left is dropped, logged with its count. Events
        in the outbox are not dropped but left there for the next start.
        Then the pool we own is closed (its idle connections go at once; that
        wait is bounded by C{timeout} too), and the outbox. Fires once all
        that is done; safe to call again, each call firing when the first
        one does.
        """
        waiter = self._stopping.wait()
        if not self._stopping.begin():
            return waiter
        self._accepting = False
        if self._adopting.running:
            self._adopting.stop()
        for queue in list(self._queues.values()):
            if queue.state == "waiting" and queue.retry is not None:
                queue.retry.cancel()
                queue.retry = None
                self._leave(queue)
        if self._held or self._storing:
            self._deadline = self.reactor.callLater(self.timeout, self._giveUp)
        self._checkStopped()
        return waiter

    def _giveUp(self) -> None:
        self._deadline = None
        self._giving_up = True
        self._ready.clear()
        for queue in list(self._queues.values()):
            if queue.request is not None:
                queue.request.cancel()  # settles at once, through _errored, which drops it all
        for queue in list(self._queues.values()):
            if queue.request is None:
                self._dropAll(queue)
        if self._queues or self._held or self._active:  # (outbox writes still out are dealt with by _stored)
            # Only a bug gets here; the bound on stop() holds all the same.
            self.log.error(
                "webhooks: {held} events and {active} requests left after the deadline; forgotten",
                held=self._held, active=self._active,
            )
            for queue in list(self._queues.values()):
                self._dropAll(queue)
            self._held = self._active = 0
            self._order.clear()
        self._checkStopped()

    def _checkStopped(self) -> None:
        if not self._stopping.begun or self._stopped or self._held or self._active or self._storing:
            return
        self._stopped = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        for throttle in self._throttles.values():
            throttle.flush()
        if self._stop_dropped:
            self.log.warn(
                "webhooks stopped: {count} events dropped undelivered", count=self._stop_dropped
            )
        if self._kept and self.outbox is not None:
            self.log.info(
                "webhooks stopped: {count} undelivered events kept in the outbox {path} for the next start",
                count=self._kept, path=self.outbox.path,
            )
        if self._owns_pool:
            closed = self._closePool()
        else:
            closed = Deferred()
            closed.callback(None)
        if self.outbox is not None:
            outbox = self.outbox
            closed.addBoth(lambda _: outbox.close()).addErrback(
                lambda failure: self.log.error(
                    "closing the webhook outbox {path} failed: {error}", path=outbox.path, error=_text(failure)
                )
            )
        closed.addBoth(lambda _: self._stopping.fire())

    def _closePool(self) -> Deferred[None]:
        """Close the cached connections, waiting at most C{timeout} for them to go."""
        done: Deferred[None] = Deferred()

        def fire(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(self.timeout, fire)
        maybeDeferred(self.pool.closeCachedConnections).addBoth(fire)
        return done



def _text(failure: Failure) -> str:
    error = failure.value
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


__all__ = ["EVENT_HEADER", "EVENT_ID_HEADER", "SIGNATURE_HEADER", "Webhooks", "sign", "verify"]
