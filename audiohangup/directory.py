# -*- test-case-name: tests.test_directory -*-
"""
The call directory: which instance holds which leg, kept in Redis, so that
several audiohangup instances can run behind one API.

Each instance registers each of its live legs when the leg's UUID arrives and
removes it when the leg ends, and keeps a presence entry of its own. Entries
are Redis hashes with a TTL of three heartbeats (C{--heartbeat}, 2 s by
default); every heartbeat rewrites the instance's presence and every live leg
of its registry, whole, with a fresh TTL. So a crashed instance's entries are
gone within one TTL of its last heartbeat, and a Redis that restarted empty is
repaired by the next heartbeat.

Keys
----
C{{prefix}:instance:{instance_id}}
    Presence: C{instance_id}, C{url} (its advertise URL), C{started_at} (ISO
    8601, when this run of the instance started) and C{heartbeat} (seconds).
C{{prefix}:leg:{call_id}:{role}}
    One leg: C{call_id}, C{role}, C{instance_id}, C{url}, C{started_at} (ISO
    8601, when the leg's connection was made) and C{started} (the same instant
    in Unix seconds, C{%.6f}: what tells one leg of an instance from a later
    one of the same call id and role).

The prefix is C{audiohangup} unless told; every key of the directory starts
with it, so one Redis database can hold several clusters. Listings use C{SCAN
MATCH} over one of the two families, which suits tens of instances and
thousands of legs.

Who owns a leg's entry
----------------------
A (call id, role) has one entry; when two instances hold a live leg for it
(Asterisk reconnected to another instance), the entry is the newest leg's:

- C{legStarted} claims the entry whatever it holds;
- a heartbeat rewrites an entry only if it is absent or already this
  instance's, so it never takes an entry back from the instance that claimed
  it last;
- C{legEnded} deletes the entry only if it is still this instance's and for
  this very leg (same C{started}); within one instance, a leg that another of
  the same call id and role replaced deletes nothing.

Each of these is one Lua script, so the check and the write are atomic.

Writes and outages
------------------
The directory has one connection to Redis (a txredisapi protocol), so its
writes reach Redis in the order they were made. Writes from the observer
methods are fire-and-forget: they never raise, never block, and are not
queued while Redis is down (they return at once). A heartbeat is one script
call for the presence and every live leg; a heartbeat is skipped while the
previous one is still unanswered. Every Redis command is answered within
C{timeout} seconds (1 s) or the connection is dropped and made again.

While Redis cannot be reached, calls carry on untouched, L{Directory.available}
is false, and the queries (L{Directory.owners}, L{Directory.legs},
L{Directory.instances}) raise L{DirectoryUnavailable} at once. The directory
reconnects by itself (after 0.1 s, doubling up to one heartbeat, at most 5 s,
with jitter), quietly: one warning when the outage starts, one info line when
it ends. On every connection, the first as after an outage, it re-registers
its presence and live legs, then removes the entries that still carry its
instance id but no live leg (left by an earlier run with the same instance
id, or by legs that ended while Redis was away).

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
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from audiohangup.interfaces import ILegObserver
from audiohangup.logs import iso_time
from audiohangup.reasons import Role

if TYPE_CHECKING:
    from audiohangup.interfaces import IServerLeg
    from audiohangup.reasons import HangupCause
    from audiohangup.registry import Registry

__all__ = [
    "DEFAULT_PREFIX",
    "Directory",
    "DirectoryUnavailable",
    "InstanceEntry",
    "LegEntry",
    "RedisAddress",
    "parse_redis_url",
]

T = TypeVar("T")

DEFAULT_PREFIX = "audiohangup"

#: Heartbeats an entry outlives its last refresh by.
TTL_HEARTBEATS = 3

#: Reconnection delays: the first, and the most (also bounded by one heartbeat).
RETRY_FIRST = 0.1
RETRY_MOST = 5.0

#: Keys asked for per SCAN round.
SCAN_COUNT = 1000

_LEG_FIELDS = ("call_id", "role", "instance_id", "url", "started_at", "started")
_INSTANCE_FIELDS = ("instance_id", "url", "started_at")

#: KEYS: [presence key,] leg keys. ARGV: TTL in ms, instance id, advertise URL,
#: mode ("claim": write whatever the entry holds; "refresh": only if it is absent
#: or ours), presence started_at ("" for no presence, then KEYS are all legs),
#: heartbeat seconds, then 4 per leg: call id, role, started_at, started.
_PUT = """
local ttl, id, url, claim = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == 'claim'
local first = 1
if ARGV[5] ~= '' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'instance_id', id, 'url', url, 'started_at', ARGV[5], 'heartbeat', ARGV[6])
  redis.call('PEXPIRE', KEYS[1], ttl)
  first = 2
end
local written = 0
for i = first, #KEYS do
  local key = KEYS[i]
  local write = claim
  if not write then
    local owner = redis.pcall('HGET', key, 'instance_id')
    write = (not owner) or type(owner) == 'table' or owner == id
  end
  if write then
    local a = 7 + (i - first) * 4
    redis.call('DEL', key)
    redis.call('HSET', key, 'call_id', ARGV[a], 'role', ARGV[a + 1], 'instance_id', id, 'url', url,
               'started_at', ARGV[a + 2], 'started', ARGV[a + 3])
    redis.call('PEXPIRE', key, ttl)
    written = written + 1
  end
end
return written
"""

#: KEYS: leg keys. ARGV: instance id, then per key the leg's "started" ("": any
#: leg of ours). Deletes each entry that is ours (and that leg's).
_REMOVE = """
local removed = 0
for i, key in ipairs(KEYS) do
  local entry = redis.pcall('HMGET', key, 'instance_id', 'started')
  if type(entry) == 'table' and entry[1] == ARGV[1] and (ARGV[i + 1] == '' or entry[2] == ARGV[i + 1]) then
    redis.call('DEL', key)
    removed = removed + 1
  end
end
return removed
"""

#: KEYS: keys found by SCAN. ARGV: hash fields. Answers {key, value...} per hash
#: (a missing field is nil; a key that is gone or not a hash is skipped).
_FETCH = """
local found = {}
for _, key in ipairs(KEYS) do
  local values = redis.pcall('HMGET', key, unpack(ARGV))
  if type(values) == 'table' and not values.err then
    local row = {key}
    for j = 1, #ARGV do row[j + 1] = values[j] end
    found[#found + 1] = row
  end
end
return found
"""


class DirectoryUnavailable(Exception):
    """Redis cannot be reached now; the message says so."""


@dataclass(frozen=True)
class LegEntry:
    """One leg of the cluster, as the directory has it."""

    call_id: str
    role: str
    instance_id: str
    url: str
    started_at: str  # ISO 8601, UTC, milliseconds


@dataclass(frozen=True)
class InstanceEntry:
    """One live instance: its presence entry, and how many legs the directory gives it."""

    instance_id: str
    url: str
    started_at: str  # ISO 8601, UTC, milliseconds
    legs: int


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


def _glob_escape(text: str) -> str:
    """C{text} matched literally by a Redis glob pattern (SCAN MATCH)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _first_failure(failure: Failure) -> Failure:
    """The failure inside a L{FirstError} from L{gatherResults}, or C{failure} itself."""
    if isinstance(failure.value, FirstError):
        inner: Failure = failure.value.subFailure
        return inner
    return failure


def _why(failure: Failure) -> str:
    message = failure.getErrorMessage()
    name = type(failure.value).__name__
    return f"{name}: {message}" if message else name


# The connection


class _RedisProtocol(txredisapi.RedisProtocol):
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
    Builds the directory's one connection. The directory connects and
    reconnects by itself (txredisapi's factories would log each attempt);
    this provides what txredisapi's protocol asks of its factory.
    """

    noisy = False
    isLazy = False  # so the protocol leaves the logging of a refused AUTH/SELECT to us
    connectionQueue = _NoQueue()

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def buildProtocol(self, addr: object) -> _RedisProtocol:
        address = self.directory.address
        protocol = _RedisProtocol(
            charset="utf-8",
            replyTimeout=self.directory.timeout,
            password=address.password,
            dbid=address.db or None,
            convertNumbers=False,
            username=address.username,
        )
        protocol.factory = self
        protocol.whenConnected().addCallback(self.directory._connected)
        protocol.whenDisconnected().addCallback(self.directory._disconnected)
        return protocol

    def stopTrying(self) -> None:
        """Called by the protocol when AUTH or SELECT is refused; we retry all the same."""

    def connectionError(self, why: str) -> None:
        self.directory._refused(why)


# The directory


@implementer(ILegObserver)
class Directory:
    """
    This instance's legs and presence in the Redis call directory, and the
    cluster's view of it; see the module docstring.

    @param redis_url: C{redis://...} or C{unix:///...}; see L{parse_redis_url}.
    @param instance_id: this instance's name in the directory.
    @param advertise_url: where other instances reach this instance's API.
    @param registry: the live legs, re-registered at every heartbeat.
    @param heartbeat: seconds between heartbeats; entries live three of them.
    @param prefix: the first part of every key.
    @param timeout: seconds Redis has to answer a command (and to accept a
        connection) before the connection is dropped and made again.
    @param password: the AUTH password, when it is kept out of the URL
        (--redis-password-file, $AUDIOHANGUP_REDIS_PASSWORD).
    """

    log = Logger()

    def __init__(
        self,
        redis_url: str,
        instance_id: str,
        advertise_url: str,
        registry: Registry,
        reactor: Any,
        *,
        heartbeat: float = 2.0,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 1.0,
        password: str | None = None,
    ) -> None:
        if not instance_id or not instance_id.isprintable() or any(c.isspace() for c in instance_id):
            raise ValueError(f"instance id {instance_id!r} must be a non-empty name without spaces")
        if not heartbeat > 0:
            raise ValueError(f"heartbeat {heartbeat!r} must be a positive number of seconds")
        if not timeout > 0:
            raise ValueError(f"timeout {timeout!r} must be a positive number of seconds")
        if not prefix:
            raise ValueError("the key prefix must not be empty")
        self.address = parse_redis_url(redis_url)
        if password is not None:
            if self.address.password is not None:
                raise ValueError("the Redis password is given twice (in the URL and apart from it)")
            self.address = replace(self.address, password=password)
        self.redis = self.address.describe()
        self.instance_id = instance_id
        self.advertise_url = advertise_url
        self.registry = registry
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.prefix = prefix
        self.timeout = timeout
        self.ttl = TTL_HEARTBEATS * heartbeat
        self.started_at = ""
        self._endpoint = self.address.endpoint(reactor, timeout)
        self._factory = _RedisFactory(self)
        self._state = "new"  # then "running", then "stopped"
        self._conn: _RedisProtocol | None = None  # the connection, once Redis answered a PING on it
        self._pending: _RedisProtocol | None = None  # a connection waiting for its PING's answer
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._failures = 0  # failed connection attempts since the last connection
        self._refusal: str | None = None  # what Redis said when it refused AUTH or SELECT
        self._last_error: str | None = None  # the last command failure, which may explain a lost connection
        self._down_since: float | None = None
        self._warned = False  # a warning about the current outage (or connection) was logged
        self._hushed = 0  # failures logged at debug only since that warning
        self._first: Deferred[None] | None = None  # fires at the first connection's outcome
        self._beating: Deferred[Any] | None = None  # the heartbeat (or sync) in flight
        self._loop = LoopingCall(self._beat)
        self._loop.clock = reactor
        self._stop_waiters: list[Deferred[None]] | None = None
        self._stopped = False

    # Keys

    def _leg_key(self, call_id: str, role: str) -> str:
        return f"{self.prefix}:leg:{call_id}:{role}"

    def _instance_key(self, instance_id: str) -> str:
        return f"{self.prefix}:instance:{instance_id}"

    @staticmethod
    def _token(leg: IServerLeg) -> str:
        return f"{leg.connected_at:.6f}"

    # Life cycle

    @property
    def available(self) -> bool:
        """The Redis connection is up now."""
        return self._conn is not None

    async def start(self) -> None:
        """
        Connect and, once connected, write the presence and live legs and
        remove the entries of an earlier run with the same instance id; then
        heartbeat. Waits a bounded time (about twice C{timeout}) for the
        first attempt; never raises for want of Redis (it logs a warning and
        keeps trying by itself).
        """
        if self._state != "new":
            return
        self._state = "running"
        self.started_at = iso_time(self.reactor.seconds())
        self._first = Deferred()
        self._connect()
        await self._within(self._first, 2 * self.timeout + 0.5)
        if self._state == "running":
            self._loop.start(self.heartbeat, now=False).addErrback(self._bug, "heartbeat loop")

    async def stop(self) -> None:
        """
        Stop heartbeating, remove this instance's presence and the entries of
        its live legs (best effort: about C{timeout} + 0.7 s at most, 1.7 s by
        default), and disconnect. Afterwards the observer methods do nothing
        and the queries raise L{DirectoryUnavailable}; a stopped directory
        does not start again. Safe to call twice: a second call fires when
        the first is done.
        """
        if self._stopped:
            return
        waiter: Deferred[None] = Deferred()
        if self._stop_waiters is not None:
            self._stop_waiters.append(waiter)
            await waiter
            return
        self._stop_waiters = [waiter]
        try:
            await self._stop()
        except Exception:
            self.log.failure("call directory: stopping failed")
        self._stopped = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for each in waiters:
            each.callback(None)

    async def _stop(self) -> None:
        self._state = "stopped"
        if self._loop.running:
            self._loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        pending, self._pending = self._pending, None
        if pending is not None and pending.connected:
            pending.transport.abortConnection()
        self._fireFirst()
        conn = self._conn
        if conn is None:
            return
        keys = [self._leg_key(call_id, leg.role.value) for leg in self._live() if (call_id := leg.call_id)]
        removal = gatherResults(
            [
                self._send(conn, "execute_command", "DEL", self._instance_key(self.instance_id)),
                self._send(conn, "eval", _REMOVE, keys, [self.instance_id, *([""] * len(keys))]),
            ],
            consumeErrors=True,
        )
        removal.addCallback(
            lambda _: self.log.info(
                "call directory: instance {instance_id} left {redis}",
                instance_id=self.instance_id, redis=self.redis,
            )
        )
        removal.addErrback(
            lambda failure: self.log.warn(
                "call directory: instance {instance_id} could not remove its entries from {redis} "
                "({why}); they expire within {ttl:g} s",
                instance_id=self.instance_id, redis=self.redis, ttl=self.ttl,
                why=_why(_first_failure(failure)),
            )
        )
        await self._within(removal, self.timeout + 0.2)  # a reply timeout drops the connection by then
        gone = conn.whenDisconnected()
        conn.transport.loseConnection()
        await self._within(gone, 0.5)
        self._conn = None

    # Connecting, quietly

    def _connect(self) -> None:
        self._retry = None
        if self._state != "running":
            return
        self._refusal = None
        attempt = self._attempt = maybeDeferred(self._endpoint.connect, self._factory)
        attempt.addCallbacks(self._transportMade, self._attemptFailed)
        attempt.addErrback(self._bug, "connecting")

    def _transportMade(self, protocol: _RedisProtocol) -> None:
        self._attempt = None
        # _connected follows once AUTH and SELECT are done (at once without them).

    def _attemptFailed(self, failure: Failure) -> None:
        self._attempt = None
        if self._state != "running":
            return  # stopped: the attempt was cancelled
        self._cannotConnect(_why(failure))

    def _refused(self, why: str) -> None:
        """Redis refused AUTH or SELECT; the protocol closes the connection next."""
        self._refusal = why

    def _connected(self, protocol: _RedisProtocol) -> None:
        """
        A connection is made (and AUTH and SELECT done): it counts once Redis
        answers a PING, so a Redis that accepts connections but does not
        answer (stopped, overloaded) is an outage, not a flapping connection.
        """
        try:
            if self._state != "running" or self._conn is not None:
                protocol.transport.loseConnection()
                return
            self._pending = protocol
            self._send(protocol, "ping").addCallbacks(
                lambda _: self._ready(protocol), self._pingFailed, errbackArgs=(protocol,)
            ).addErrback(self._bug, "checking a new connection")
        except Exception:
            self.log.failure("call directory: handling a new Redis connection failed")

    def _pingFailed(self, failure: Failure, protocol: _RedisProtocol) -> None:
        if self._pending is protocol:
            self._pending = None
        failure.trap(txredisapi.RedisError)
        self._refusal = _why(failure)  # e.g. NOAUTH when Redis wants a password
        if protocol.connected:
            protocol.transport.abortConnection()

    def _ready(self, protocol: _RedisProtocol) -> None:
        """Redis answers on this connection: re-register everything."""
        if self._pending is protocol:
            self._pending = None
        if self._state != "running" or self._conn is not None or not protocol.connected:
            if protocol.connected:
                protocol.transport.loseConnection()
            return
        self._conn = protocol
        self._failures = 0
        self._last_error = None
        legs = len(self._live())
        if self._down_since is not None:
            self.log.info(
                "call directory: Redis at {redis} is back after {seconds:.1f} s; "
                "re-registering {legs} live legs of instance {instance_id}",
                redis=self.redis, seconds=self.reactor.seconds() - self._down_since, legs=legs,
                instance_id=self.instance_id, hushed=self._hushed,
            )
        else:
            self.log.info(
                "call directory: instance {instance_id} connected to Redis at {redis}; "
                "registering {legs} live legs",
                redis=self.redis, legs=legs, instance_id=self.instance_id,
            )
        self._down_since = None
        self._warned = False
        self._hushed = 0
        synced = self._beating = Deferred.fromCoroutine(self._sync(protocol))
        synced.addErrback(self._writeFailed, "re-register the live legs")
        synced.addBoth(self._beaten, synced)
        synced.addBoth(lambda _: self._fireFirst())

    def _disconnected(self, protocol: _RedisProtocol) -> None:
        try:
            was_ready = protocol is self._conn
            if was_ready:
                self._conn = None
            if self._pending is protocol:
                self._pending = None
            if self._state != "running":
                return
            if was_ready:
                why = self._last_error or (
                    _why(protocol.lost_reason) if protocol.lost_reason is not None else "connection lost"
                )
                self._outage(
                    "call directory: lost its connection to Redis at {redis} ({why}); calls go on, "
                    "cluster look-ups fail until it is back; reconnecting",
                    why,
                )
                self._scheduleRetry()
            else:
                lost = _why(protocol.lost_reason) if protocol.lost_reason is not None else "connection lost"
                self._cannotConnect(self._refusal or f"closed before Redis answered: {lost}")
        except Exception:
            self.log.failure("call directory: handling a lost Redis connection failed")

    def _cannotConnect(self, why: str) -> None:
        self._failures += 1
        self._outage(
            "call directory: cannot reach Redis at {redis} ({why}); calls go on, "
            "cluster look-ups fail until it is reachable; retrying",
            why,
        )
        self._fireFirst()
        self._scheduleRetry()

    def _outage(self, text: str, why: str) -> None:
        if self._down_since is None:
            self._down_since = self.reactor.seconds()
        if self._warned:
            self._hushed += 1
            self.log.debug(text, redis=self.redis, why=why, instance_id=self.instance_id)
        else:
            self._warned = True
            self.log.warn(text, redis=self.redis, why=why, instance_id=self.instance_id)

    def _scheduleRetry(self) -> None:
        if self._state != "running" or self._retry is not None or self._attempt is not None or self._conn:
            return
        most = min(self.heartbeat, RETRY_MOST)
        delay = min(most, RETRY_FIRST * 2 ** min(self._failures, 32))
        delay *= random.uniform(0.9, 1.1)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _fireFirst(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            first.callback(None)

    # Writing

    def _live(self) -> list[IServerLeg]:
        return [leg for leg in self.registry if leg.call_id is not None]

    def _legArgs(self, legs: Iterable[IServerLeg]) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args: list[str] = []
        for leg in legs:
            assert leg.call_id is not None
            role = leg.role.value
            keys.append(self._leg_key(leg.call_id, role))
            args += [leg.call_id, role, iso_time(leg.connected_at), self._token(leg)]
        return keys, args

    def _put(self, conn: _RedisProtocol, legs: Iterable[IServerLeg], *, claim: bool,
             presence: bool) -> Deferred[Any]:
        keys, args = self._legArgs(legs)
        head = [str(int(self.ttl * 1000)), self.instance_id, self.advertise_url, "claim" if claim else "refresh"]
        if presence:
            keys.insert(0, self._instance_key(self.instance_id))
            head += [self.started_at, f"{self.heartbeat:g}"]
        else:
            head += ["", ""]
        return self._send(conn, "eval", _PUT, keys, head + args)

    @staticmethod
    def _send(conn: _RedisProtocol, method: str, *args: Any) -> Deferred[Any]:
        """A command on C{conn}; a connection that just went away fails the Deferred, never raises."""
        return maybeDeferred(getattr(conn, method), *args)

    async def _sync(self, conn: _RedisProtocol) -> None:
        """Write the presence and every live leg, then remove our entries with no live leg."""
        await self._put(conn, self._live(), claim=False, presence=True)
        stale = 0
        pattern = f"{_glob_escape(self.prefix)}:leg:*"
        async for found in self._scan(conn, pattern, ("instance_id", "started", "call_id", "role")):
            keys, tokens = [], []
            for key, instance_id, started, call_id, role in found:
                if instance_id != self.instance_id or started is None:
                    continue
                live = None
                if call_id is not None and role in Role._value2member_map_:
                    live = self.registry.get(call_id, Role(role))
                if live is None or self._token(live) != started or key != self._leg_key(call_id, role):
                    keys.append(key)
                    tokens.append(started)
            if keys:
                stale += int(await self._send(conn, "eval", _REMOVE, keys, [self.instance_id, *tokens]) or 0)
        if stale:
            self.log.info(
                "call directory: removed {stale} stale leg entries of instance {instance_id}",
                stale=stale, instance_id=self.instance_id,
            )

    def _beat(self) -> None:
        """One heartbeat: presence and live legs, rewritten with a fresh TTL; skipped if one is in flight."""
        try:
            conn = self._conn
            if conn is None or self._state != "running" or self._beating is not None:
                return
            beat = self._beating = self._put(conn, self._live(), claim=False, presence=True)
            beat.addErrback(self._writeFailed, "refresh its entries")
            beat.addBoth(self._beaten, beat)
        except Exception:
            self.log.failure("call directory: heartbeat failed")

    def _beaten(self, result: object, beat: Deferred[Any]) -> None:
        if self._beating is beat:
            self._beating = None

    def _writeFailed(self, failure: Failure, what: str, **fields: Any) -> None:
        if not failure.check(txredisapi.RedisError):
            self._bug(failure, what)
            return
        why = _why(failure)
        if failure.check(txredisapi.ConnectionError):
            # The connection is going or gone: the disconnection is what gets logged.
            self._last_error = why
            self.log.debug(
                "call directory: could not {what}: {why}", what=what, why=why, redis=self.redis, **fields
            )
            return
        if self._warned:
            self._hushed += 1
            self.log.debug(
                "call directory: could not {what}: {why}", what=what, why=why, redis=self.redis, **fields
            )
        else:
            self._warned = True
            self.log.warn(
                "call directory: could not {what} in Redis at {redis}: {why}; "
                "the next heartbeat tries again (further failures are logged at debug level)",
                what=what, why=why, redis=self.redis, **fields,
            )

    def _bug(self, failure: Failure, what: str) -> None:
        self.log.failure("call directory: {what} failed unexpectedly", failure, what=what)

    # ILegObserver: these only start a write, and never raise.

    def legStarted(self, leg: IServerLeg) -> None:
        try:
            conn = self._conn
            if conn is None or self._state != "running" or leg.call_id is None:
                return  # the heartbeat after the reconnection registers it
            self._put(conn, [leg], claim=True, presence=False).addErrback(
                self._writeFailed, "register a leg", call_id=leg.call_id, role=leg.role
            )
        except Exception:
            self.log.failure("{call_id} call directory: registering the leg failed", call_id=leg.call_id)

    def legEnded(self, leg: IServerLeg) -> None:
        try:
            conn = self._conn
            if conn is None or self._state != "running" or leg.call_id is None:
                return  # it expires, or the sync after the reconnection removes it
            current = self.registry.get(leg.call_id, leg.role)
            if current is not None and current is not leg:
                return  # replaced here: the entry is the new leg's
            self._send(
                conn, "eval", _REMOVE,
                [self._leg_key(leg.call_id, leg.role.value)], [self.instance_id, self._token(leg)],
            ).addErrback(self._writeFailed, "remove a leg", call_id=leg.call_id, role=leg.role)
        except Exception:
            self.log.failure("{call_id} call directory: removing the leg failed", call_id=leg.call_id)

    def hangupSent(self, leg: IServerLeg, cause: HangupCause) -> None:
        pass

    def callEnded(self, call_id: str) -> None:
        pass

    def connectionEnded(self, connection: IServerLeg) -> None:
        pass

    # Queries

    def _connection(self) -> _RedisProtocol:
        conn = self._conn
        if conn is None:
            if self._state == "stopped":
                raise DirectoryUnavailable("the call directory is stopped")
            raise DirectoryUnavailable(
                f"the call directory is unavailable: no connection to Redis at {self.redis}"
            )
        return conn

    async def _ask(self, what: str, query: Callable[[_RedisProtocol], Awaitable[T]]) -> T:
        conn = self._connection()
        try:
            return await query(conn)
        except txredisapi.RedisError as error:
            raise DirectoryUnavailable(
                f"the call directory is unavailable: Redis at {self.redis} failed {what}: {error}"
            ) from None

    async def _fetch(
        self, conn: _RedisProtocol, keys: list[str], fields: tuple[str, ...]
    ) -> list[tuple[Any, ...]]:
        """The hashes at C{keys}: (key, field values...) each, C{None} for a missing field."""
        rows = await self._send(conn, "eval", _FETCH, keys, list(fields))
        width = len(fields) + 1
        return [tuple(row[:width]) + (None,) * (width - len(row)) for row in rows]

    async def _scan(
        self, conn: _RedisProtocol, pattern: str, fields: tuple[str, ...]
    ) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Yield, per SCAN round, the hashes matching C{pattern}: (key, field values...) each."""
        seen: set[str] = set()
        cursor = "0"
        while True:
            reply = await self._send(
                conn, "execute_command", "SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT
            )
            cursor = str(reply[0])
            keys = [key for key in reply[1] if key not in seen]
            seen.update(keys)
            if keys:
                yield await self._fetch(conn, keys, fields)
            if cursor == "0":
                return

    @staticmethod
    def _legEntry(values: tuple[Any, ...]) -> LegEntry | None:
        call_id, role, instance_id, url, started_at = values
        if None in (call_id, role, instance_id, url, started_at):
            return None  # half gone, or not ours to read
        return LegEntry(call_id=call_id, role=role, instance_id=instance_id, url=url, started_at=started_at)

    async def owners(self, call_id: str) -> dict[str, LegEntry]:
        """The legs of C{call_id}, role -> entry, in any instance; L{DirectoryUnavailable} without Redis."""

        async def query(conn: _RedisProtocol) -> dict[str, LegEntry]:
            keys = [self._leg_key(call_id, role.value) for role in Role]
            found = {}
            for row in await self._fetch(conn, keys, _LEG_FIELDS[:5]):
                entry = self._legEntry(row[1:6])
                if entry is not None and entry.call_id == call_id:
                    found[entry.role] = entry
            return {role.value: found[role.value] for role in Role if role.value in found}

        return await self._ask("to look up a call", query)

    async def legs(self) -> list[LegEntry]:
        """Every leg of the cluster, by call id then role; L{DirectoryUnavailable} without Redis."""
        return await self._ask("to list the legs", self._legs)

    async def _legs(self, conn: _RedisProtocol) -> list[LegEntry]:
        entries = []
        async for found in self._scan(conn, f"{_glob_escape(self.prefix)}:leg:*", _LEG_FIELDS[:5]):
            for row in found:
                entry = self._legEntry(row[1:6])
                if entry is not None:
                    entries.append(entry)
        return sorted(entries, key=lambda entry: (entry.call_id, entry.role))

    async def instances(self) -> list[InstanceEntry]:
        """The live instances, by instance id, each with its number of legs in the directory."""

        async def query(conn: _RedisProtocol) -> list[InstanceEntry]:
            counts: dict[str, int] = {}
            for entry in await self._legs(conn):
                counts[entry.instance_id] = counts.get(entry.instance_id, 0) + 1
            found = []
            async for rows in self._scan(conn, f"{_glob_escape(self.prefix)}:instance:*", _INSTANCE_FIELDS):
                for _, instance_id, url, started_at in rows:
                    if None in (instance_id, url, started_at):
                        continue
                    found.append(InstanceEntry(instance_id, url, started_at, counts.get(instance_id, 0)))
            return sorted(found, key=lambda entry: entry.instance_id)

        return await self._ask("to list the instances", query)

    # Helpers

    async def _within(self, deferred: Deferred[Any], seconds: float) -> None:
        """
        Wait for C{deferred} at most C{seconds}; never raises. C{deferred} is
        ours and its result is not used afterwards (a failure is consumed:
        whoever made it has logged it).
        """
        done: Deferred[None] = Deferred()

        def settled(result: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(seconds, settled, None)
        deferred.addBoth(settled)
        await done
