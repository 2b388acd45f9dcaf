# -*- test-case-name: tests.test_directory -*-
"""
The one connection to Redis of the call directory: where Redis is (its URL),
and a L{twisted.application.internet.ClientService} that connects, makes the
connection again whenever it is lost, and hands out only connections Redis
answers on.

A connection counts once AUTH and SELECT are done (when the URL asks for
them) and Redis answered a PING, so a Redis that accepts connections but does
not answer (stopped, overloaded) is an outage, not a flapping connection.
Every command, these included, is answered within the reply timeout or the
connection is dropped. After a lost connection or a failed attempt the next
attempt waits 0.1 s, doubling up to the most (one heartbeat, at most 5 s),
each delay times a random 0.9-1.1 so that the instances of a cluster do not
reconnect in step.

URLs
----
C{redis://[[user]:password@]host[:port][/db]} (port 6379, database 0 by
default; C{?db=N} works too), or C{unix:///path/to/redis.sock} with optional
C{?db=N&password=...} (or C{unix://:password@/path}). C{rediss://} (TLS) is
not supported. L{parse_redis_url} checks one and raises L{ValueError} naming
the problem.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as Interface
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "RETRY_FIRST",
    "RETRY_MOST",
    "RedisAddress",
    "RedisConnection",
    "RedisObserver",
    "RedisProtocol",
    "failure_text",
    "parse_redis_url",
]

#: Reconnection delays: the first, and the most (the directory also bounds it by one heartbeat).
RETRY_FIRST = 0.1
RETRY_MOST = 5.0


def failure_text(failure: Failure) -> str:
    """C{ExceptionName: message}, for a log line."""
    message = failure.getErrorMessage()
    name = type(failure.value).__name__
    return f"{name}: {message}" if message else name


# Redis URLs


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: a TCP host and port, or a unix socket path; the database and credentials."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        """The address for logs and messages, without credentials."""
        suffix = f"/{self.db}" if self.db else ""
        if self.path is not None:
            return f"unix://{self.path}" + (f"?db={self.db}" if self.db else "")
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{host}:{self.port}{suffix}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_redis_url(url: str) -> RedisAddress:
    """
    C{redis://[[user]:password@]host[:port][/db]} or C{unix:///path[?db=N&password=...]}
    as a L{RedisAddress}; L{ValueError} naming the problem otherwise.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"Redis URL does not parse: {error}") from None
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"db", "password"})
    if unknown:
        raise ValueError(f"Redis URL: unknown parameter {unknown[0]!r} (db and password are known)")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if "password" in query:
        password = query["password"][-1] or None
    db_text = query["db"][-1] if "db" in query else ""
    if parts.scheme == "redis":
        if parts.path not in ("", "/"):
            if db_text:
                raise ValueError("Redis URL: the database is given twice (path and ?db=)")
            db_text = parts.path[1:]
        host = parts.hostname or "localhost"
        address = RedisAddress(host=host, port=port if port is not None else 6379)
    elif parts.scheme == "unix":
        if parts.hostname or port is not None:
            raise ValueError("Redis URL: unix:///path/to/redis.sock takes a path, not a host (three slashes)")
        if not parts.path or not parts.path.startswith("/"):
            raise ValueError("Redis URL: unix:// needs an absolute socket path, e.g. unix:///run/redis.sock")
        address = RedisAddress(path=unquote(parts.path))
    elif parts.scheme == "rediss":
        raise ValueError("Redis URL: rediss:// (TLS) is not supported; use redis:// or unix://")
    else:
        raise ValueError(f"Redis URL {url!r} must start with redis:// or unix://")
    db = 0
    if db_text:
        if not db_text.isdigit():
            raise ValueError(f"Redis URL: database {db_text!r} is not a number")
        db = int(db_text)
    return RedisAddress(
        host=address.host, port=address.port, path=address.path, db=db, username=username, password=password
    )


# The connection


class RedisProtocol(txredisapi.RedisProtocol):
    """txredisapi's protocol, remembering why its connection was lost."""

    lost_reason: Failure | None = None

    def connectionLost(self, why: Failure) -> None:
        self.lost_reason = why
        super().connectionLost(why)


class _NoQueue:
    """txredisapi's protocol hands a connection back to its pool after MULTI or a pipeline; we have no pool."""

    def put(self, connection: object) -> None:
        pass


class _RedisFactory(Factory):
    """
    Builds the protocol of one attempt, without AUTH and SELECT (L{_ReadyEndpoint}
    sends them, so that it alone says why a connection is refused), and
    provides what txredisapi's protocol asks of its factory.
    """

    noisy = False
    connectionQueue = _NoQueue()

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def buildProtocol(self, addr: object) -> RedisProtocol:
        protocol = RedisProtocol(charset="utf-8", replyTimeout=self.timeout, convertNumbers=False)
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        """Called by txredisapi's QUIT and SHUTDOWN, which the directory never sends."""


class _Refused(Exception):
    """A connection attempt failed; the message says why, as the log line shows it."""


class _StandIn(Protocol):
    """
    What L{ClientService} holds for a ready connection (its factory builds it,
    wrapped in a proxy that tells it of the loss): it closes the transport to
    stop, and is told by the Redis protocol when the connection is lost.
    """

    def __init__(self, redis: RedisProtocol, connection: RedisConnection) -> None:
        self.redis = redis
        self._connection = connection

    def connectionMade(self) -> None:
        self._connection._ready(self.redis)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connection._lost(self.redis)


@implementer(IStreamClientEndpoint)
class _ReadyEndpoint(Factory):
    """
    The endpoint L{ClientService} connects with, and the factory of its
    L{_StandIn}s: it connects to Redis, sends AUTH and SELECT when the URL
    asks for them and a PING, and only then answers with the connection. A
    connection refused at any step is aborted here and never reaches
    ClientService (L{RedisConnection} says why this is not ClientService's
    C{prepareConnection}).
    """

    noisy = False

    def __init__(self, connection: RedisConnection, address: RedisAddress, reactor: Any, timeout: float) -> None:
        self._connection = connection
        self._address = address
        self._endpoint = address.endpoint(reactor, timeout)
        self._factory = _RedisFactory(timeout)
        self._handing: RedisProtocol | None = None  # the ready connection, while ClientService builds its stand-in

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """C{protocolFactory} is ClientService's proxy of this very factory."""
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    def buildProtocol(self, addr: IAddress | None) -> _StandIn:
        assert self._handing is not None
        return _StandIn(self._handing, self._connection)

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        try:
            redis = cast(RedisProtocol, await self._endpoint.connect(self._factory))
        except CancelledError:
            raise  # stopped
        except Exception:
            self._connection._unreachable(failure_text(Failure()))
            raise
        try:
            await self._prepare(redis)
        except BaseException as error:
            if redis.connected:
                redis.transport.abortConnection()
            if not isinstance(error, CancelledError):
                self._connection._unreachable(str(error))
            raise
        self._handing = redis
        try:
            held = protocolFactory.buildProtocol(redis.transport.getPeer())
        finally:
            self._handing = None
        assert held is not None
        held.makeConnection(redis.transport)
        redis.whenDisconnected().addCallback(lambda _: held.connectionLost(redis.lost_reason or connectionDone))
        return held

    async def _prepare(self, redis: RedisProtocol) -> None:
        """AUTH, SELECT and PING, each answered; L{_Refused} saying why otherwise."""
        address = self._address
        steps: list[tuple[str, Callable[[], Deferred[Any]]]] = []
        if address.password is not None:
            steps.append(("Redis error: could not auth", lambda: redis.auth(address.password, address.username)))
        if address.db:
            steps.append((f"Redis error: could not set dbid={address.db}", lambda: redis.select(address.db)))
        steps.append(("", redis.ping))
        for what, send in steps:
            try:
                await send()
            except txredisapi.RedisError as error:
                lost = redis.lost_reason
                if lost is not None and not isinstance(error, txredisapi.TimeoutError):
                    raise _Refused(f"closed before Redis answered: {failure_text(lost)}") from None
                raise _Refused(f"{what}: {error}" if what else failure_text(Failure())) from None


class RedisObserver(Interface):
    """What L{RedisConnection} tells of its connection, as it happens."""

    def redisConnected(self, protocol: RedisProtocol) -> None:
        """A connection is ready: Redis answers on it."""

    def redisLost(self, protocol: RedisProtocol, why: str) -> None:
        """The ready connection is gone; the next attempt follows by itself."""

    def redisUnreachable(self, why: str) -> None:
        """An attempt failed (no connection, AUTH or SELECT refused, no answer); the next one follows."""


class _AtDebug(Logger):
    """A logger that logs every line at debug level."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        super().emit(LogLevel.debug, format, **kwargs)


class RedisConnection(ClientService):
    """
    The directory's one connection to Redis, made again whenever it is lost;
    see the module docstring. L{current} is the connection while it is up,
    L{RedisObserver} is told of each change, and L{whenConnected} fires with
    the stand-in ClientService holds (its C{redis} is the connection).

    Why ClientService's C{prepareConnection} does not send the AUTH, SELECT
    and PING (L{_ReadyEndpoint} does): a connection it rejects is left open,
    and closing it, or Redis closing it while AUTH or PING is pending, tells
    ClientService's state machine of a loss it has no transition for
    (C{_clientDisconnected} in Connecting, Waiting or Stopped). Measured on
    Twisted 26.10 and 24.7: a PING that times out and aborts its TCP
    connection logs "Unhandled Error ... automat NoTransition" from the
    reactor, once per rejected connection (the in-memory twin is
    tests.test_directory.test_client_service_cannot_close_a_rejected_connection).
    So the endpoint hands ClientService only connections that are ready.

    ClientService logs one info line per retry ("Scheduling retry ..."); a
    Redis outage is logged once by the directory, so those lines go at debug
    level (C{_log}, the logger ClientService hands its state machine).
    """

    _log = _AtDebug()

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any,
        observer: RedisObserver,
        *,
        timeout: float,
        retry_most: float = RETRY_MOST,
    ) -> None:
        self.address = address
        self.current: RedisProtocol | None = None
        self._observer = observer
        doubling = backoffPolicy(RETRY_FIRST, retry_most, 2.0, jitter=lambda: 0.0)
        endpoint = _ReadyEndpoint(self, address, reactor, timeout)
        super().__init__(
            endpoint,
            endpoint,
            # ClientService counts the failures, 1 for the first attempt after a loss.
            retryPolicy=lambda failures: doubling(failures - 1) * random.uniform(0.9, 1.1),
            clock=reactor,
        )

    def _ready(self, protocol: RedisProtocol) -> None:
        self.current = protocol
        self._observer.redisConnected(protocol)

    def _lost(self, protocol: RedisProtocol) -> None:
        if self.current is protocol:
            self.current = None
        reason = protocol.lost_reason
        self._observer.redisLost(protocol, failure_text(reason) if reason is not None else "connection lost")

    def _unreachable(self, why: str) -> None:
        self._observer.redisUnreachable(why)
