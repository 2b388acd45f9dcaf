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
    8601, when this run of the instance started), C{heartbeat} (seconds) and
    C{link} (C{host:port} of its media link listener, empty without one).
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
The directory has one connection to Redis (L{RedisConnection}, a
ClientService), so its writes reach Redis in the order they were made.
Writes from the observer methods are fire-and-forget: they never raise,
never block, and are not queued while Redis is down (they return at once). A
heartbeat is one script call for the presence and every live leg; a
heartbeat is skipped while the previous one is still unanswered. Every Redis
command is answered within C{timeout} seconds (1 s) or the connection is
dropped and made again.

While Redis cannot be reached, calls carry on untouched, L{Directory.available}
is false, and the queries (L{Directory.owners}, L{Directory.legs},
L{Directory.instances}) raise L{DirectoryUnavailable} at once. The connection
is made again by itself (after 0.1 s, doubling up to one heartbeat, at most
5 s, with jitter), quietly: one warning when the outage starts, one info line
when it ends. On every connection, the first as after an outage, the
directory re-registers its presence and live legs, then removes the entries
that still carry its instance id but no live leg (left by an earlier run with
the same instance id, or by legs that ended while Redis was away).

The Redis URL is read by L{audiohangup.cluster.redis.parse_redis_url}.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import txredisapi
from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from audiohangup.cluster.redis import RETRY_MOST, RedisConnection, RedisProtocol, failure_text, parse_redis_url
from audiohangup.events import LegObserver
from audiohangup.interfaces import ILegObserver, IRemoteLeg
from audiohangup.lifecycle import Once, Part
from audiohangup.logs import iso_time
from audiohangup.reasons import Role

if TYPE_CHECKING:
    from audiohangup.interfaces import IServerLeg
    from audiohangup.registry import Registry

__all__ = [
    "DEFAULT_PREFIX",
    "CallDirectory",
    "Directory",
    "DirectoryUnavailable",
    "InstanceEntry",
    "LegEntry",
]

T = TypeVar("T")

DEFAULT_PREFIX = "audiohangup"

#: Heartbeats an entry outlives its last refresh by.
TTL_HEARTBEATS = 3

#: Keys asked for per SCAN round.
SCAN_COUNT = 1000

_LEG_FIELDS = ("call_id", "role", "instance_id", "url", "started_at", "started")
_INSTANCE_FIELDS = ("instance_id", "url", "started_at")

#: KEYS: [presence key,] leg keys. ARGV: TTL in ms, instance id, advertise URL,
#: mode ("claim": write whatever the entry holds; "refresh": only if it is absent
#: or ours), presence started_at ("" for no presence, then KEYS are all legs),
#: heartbeat seconds, link address, then 4 per leg: call id, role, started_at, started.
_PUT = """
local ttl, id, url, claim = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == 'claim'
local first = 1
if ARGV[5] ~= '' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'instance_id', id, 'url', url, 'started_at', ARGV[5], 'heartbeat', ARGV[6],
             'link', ARGV[7])
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
    local a = 8 + (i - first) * 4
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


class CallDirectory(Protocol):
    """
    What the forwarding, the media link and the API ask of a call directory:
    L{Directory} (Redis, a cluster of hosts) or
    L{audiohangup.cluster.localdirectory.LocalDirectory} (files, the
    processes of one host). Each is also the registry's observer and a part
    of the service named C{directory}.
    """

    instance_id: str
    heartbeat: float
    #: Where this instance's media link listens (C{host:port}), set by its listener; "" without one.
    link: str

    async def owners(self, call_id: str) -> dict[str, LegEntry]: ...

    async def link_of(self, instance_id: str) -> str | None: ...

    async def legs(self) -> list[LegEntry]: ...

    async def instances(self) -> list[InstanceEntry]: ...


def _glob_escape(text: str) -> str:
    """C{text} matched literally by a Redis glob pattern (SCAN MATCH)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _first_failure(failure: Failure) -> Failure:
    """The failure inside a L{FirstError} from L{gatherResults}, or C{failure} itself."""
    if isinstance(failure.value, FirstError):
        inner: Failure = failure.value.subFailure
        return inner
    return failure


# Talking to Redis


def _send(conn: RedisProtocol, method: str, *args: Any) -> Deferred[Any]:
    """A command on C{conn}; a connection that just went away fails the Deferred, never raises."""
    return maybeDeferred(getattr(conn, method), *args)


async def _fetch(conn: RedisProtocol, keys: list[str], fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The hashes at C{keys}: (key, field values...) each, C{None} for a missing field."""
    rows = await _send(conn, "eval", _FETCH, keys, list(fields))
    width = len(fields) + 1
    return [tuple(row[:width]) + (None,) * (width - len(row)) for row in rows]


async def _scan(conn: RedisProtocol, pattern: str, fields: tuple[str, ...]) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Yield, per SCAN round, the hashes matching C{pattern}: (key, field values...) each."""
    seen: set[str] = set()
    cursor = "0"
    while True:
        reply = await _send(conn, "execute_command", "SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
        cursor = str(reply[0])
        keys = [key for key in reply[1] if key not in seen]
        seen.update(keys)
        if keys:
            yield await _fetch(conn, keys, fields)
        if cursor == "0":
            return


def _leg_entry(values: tuple[Any, ...]) -> LegEntry | None:
    call_id, role, instance_id, url, started_at = values
    if None in (call_id, role, instance_id, url, started_at):
        return None  # half gone, or not ours to read
    return LegEntry(call_id=call_id, role=role, instance_id=instance_id, url=url, started_at=started_at)


# The directory


class _State(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"  # stopping, or stopped: the observer methods and queries do nothing from then on


@implementer(ILegObserver)
class Directory(Part, LegObserver):
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

    name = "directory"
    startFailed = "the call directory did not start"

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
        #: Where other instances reach this one's media link (C{host:port}), once it listens; "" without one.
        self.link = ""
        self._state = _State.NEW
        self._redis = RedisConnection(
            self.address, reactor, self, timeout=timeout, retry_most=min(heartbeat, RETRY_MOST)
        )
        self._stopping = Once()  # a second stop() waits for the first
        self._last_error: str | None = None  # the last command failure, which may explain a lost connection
        self._down_since: float | None = None
        self._warned = False  # a warning about the current outage (or connection) was logged
        self._hushed = 0  # failures logged at debug only since that warning
        self._beating: Deferred[Any] | None = None  # the heartbeat (or sync) in flight
        self._loop = LoopingCall(self._beat)
        self._loop.clock = reactor

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
        return self._state is _State.RUNNING and self._redis.current is not None

    async def start(self) -> None:
        """
        Connect and, once connected, write the presence and live legs and
        remove the entries of an earlier run with the same instance id; then
        heartbeat. Waits a bounded time (about twice C{timeout}) for the
        first attempt; never raises for want of Redis (it logs a warning and
        keeps trying by itself).
        """
        if self._state is not _State.NEW:
            return
        self._state = _State.RUNNING
        self.started_at = iso_time(self.reactor.seconds())
        first = Deferred.fromCoroutine(self._firstConnection())
        self._redis.startService()
        await _waitAtMost(self.reactor, first, 2 * self.timeout + 0.5)
        if self._state is _State.RUNNING:
            self._loop.start(self.heartbeat, now=False).addErrback(self._bug, "heartbeat loop")

    async def _firstConnection(self) -> None:
        """The first attempt's outcome: a failure, or a connection and its first sync."""
        await self._redis.whenConnected(failAfterFailures=1)
        if self._beating is not None:
            await self._beating

    async def stop(self) -> None:
        """
        Stop heartbeating, remove this instance's presence and the entries of
        its live legs (best effort: about C{timeout} + 0.7 s at most, 1.7 s by
        default), and disconnect. Afterwards the observer methods do nothing
        and the queries raise L{DirectoryUnavailable}; a stopped directory
        does not start again. Safe to call twice: a second call fires when
        the first is done.
        """
        if not self._stopping.begin():
            await self._stopping.wait()
            return
        self._state = _State.STOPPED
        try:
            await self._stop()
        except Exception:
            self.log.failure("call directory: stopping failed")
        finally:
            self._stopping.fire()

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        conn = self._redis.current
        if conn is not None:
            await _waitAtMost(self.reactor, self._removeOwn(conn), self.timeout + 0.2)  # a reply timeout drops it
        await _waitAtMost(self.reactor, self._redis.stopService(), 0.5)

    def _removeOwn(self, conn: RedisProtocol) -> Deferred[Any]:
        """Delete the presence and the entries of the live legs; log how that went."""
        keys = [self._leg_key(call_id, leg.role.value) for leg in self._live() if (call_id := leg.call_id)]
        removal = gatherResults(
            [
                _send(conn, "execute_command", "DEL", self._instance_key(self.instance_id)),
                _send(conn, "eval", _REMOVE, keys, [self.instance_id, *([""] * len(keys))]),
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
                why=failure_text(_first_failure(failure)),
            )
        )
        return removal

    # RedisObserver: what the connection tells, logged quietly (one warning per outage)

    def redisConnected(self, protocol: RedisProtocol) -> None:
        """Redis answers on a new connection: re-register everything."""
        try:
            if self._state is not _State.RUNNING:
                return
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
        except Exception:
            self.log.failure("call directory: handling a new Redis connection failed")

    def redisLost(self, protocol: RedisProtocol, why: str) -> None:
        if self._state is _State.RUNNING:
            self._outage(
                "call directory: lost its connection to Redis at {redis} ({why}); calls go on, "
                "cluster look-ups fail until it is back; reconnecting",
                self._last_error or why,
            )

    def redisUnreachable(self, why: str) -> None:
        if self._state is _State.RUNNING:
            self._outage(
                "call directory: cannot reach Redis at {redis} ({why}); calls go on, "
                "cluster look-ups fail until it is reachable; retrying",
                why,
            )

    def _outage(self, text: str, why: str) -> None:
        if self._down_since is None:
            self._down_since = self.reactor.seconds()
        if self._warned:
            self._hushed += 1
            self.log.debug(text, redis=self.redis, why=why, instance_id=self.instance_id)
        else:
            self._warned = True
            self.log.warn(text, redis=self.redis, why=why, instance_id=self.instance_id)

    # Writing

    def _writable(self) -> RedisProtocol | None:
        """The connection, while it is up and the directory running."""
        return self._redis.current if self._state is _State.RUNNING else None

    def _live(self) -> list[IServerLeg]:
        """The legs whose connections this instance holds (a remote leg's is on another instance)."""
        return [leg for leg in self.registry if leg.call_id is not None and not IRemoteLeg.providedBy(leg)]

    def _legArgs(self, legs: Iterable[IServerLeg]) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args: list[str] = []
        for leg in legs:
            assert leg.call_id is not None
            role = leg.role.value
            keys.append(self._leg_key(leg.call_id, role))
            args += [leg.call_id, role, iso_time(leg.connected_at), self._token(leg)]
        return keys, args

    def _put(self, conn: RedisProtocol, legs: Iterable[IServerLeg], *, claim: bool,
             presence: bool) -> Deferred[Any]:
        keys, args = self._legArgs(legs)
        head = [str(int(self.ttl * 1000)), self.instance_id, self.advertise_url, "claim" if claim else "refresh"]
        if presence:
            keys.insert(0, self._instance_key(self.instance_id))
            head += [self.started_at, f"{self.heartbeat:g}", self.link]
        else:
            head += ["", "", ""]
        return _send(conn, "eval", _PUT, keys, head + args)

    async def _sync(self, conn: RedisProtocol) -> None:
        """Write the presence and every live leg, then remove our entries with no live leg."""
        await self._put(conn, self._live(), claim=False, presence=True)
        stale = 0
        pattern = f"{_glob_escape(self.prefix)}:leg:*"
        async for found in _scan(conn, pattern, ("instance_id", "started", "call_id", "role")):
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
                stale += int(await _send(conn, "eval", _REMOVE, keys, [self.instance_id, *tokens]) or 0)
        if stale:
            self.log.info(
                "call directory: removed {stale} stale leg entries of instance {instance_id}",
                stale=stale, instance_id=self.instance_id,
            )

    def _beat(self) -> None:
        """One heartbeat: presence and live legs, rewritten with a fresh TTL; skipped if one is in flight."""
        try:
            conn = self._writable()
            if conn is None or self._beating is not None:
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
        why = failure_text(failure)
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
            conn = self._writable()
            if conn is None or leg.call_id is None or IRemoteLeg.providedBy(leg):
                return  # the heartbeat after the reconnection registers it; a remote leg is its instance's
            self._put(conn, [leg], claim=True, presence=False).addErrback(
                self._writeFailed, "register a leg", call_id=leg.call_id, role=leg.role
            )
        except Exception:
            self.log.failure("{call_id} call directory: registering the leg failed", call_id=leg.call_id)

    def legEnded(self, leg: IServerLeg) -> None:
        try:
            conn = self._writable()
            if conn is None or leg.call_id is None or IRemoteLeg.providedBy(leg):
                return  # it expires, or the sync after the reconnection removes it
            current = self.registry.get(leg.call_id, leg.role)
            if current is not None and current is not leg:
                return  # replaced here: the entry is the new leg's
            _send(
                conn, "eval", _REMOVE,
                [self._leg_key(leg.call_id, leg.role.value)], [self.instance_id, self._token(leg)],
            ).addErrback(self._writeFailed, "remove a leg", call_id=leg.call_id, role=leg.role)
        except Exception:
            self.log.failure("{call_id} call directory: removing the leg failed", call_id=leg.call_id)

    # Queries

    def _connection(self) -> RedisProtocol:
        conn = self._writable()
        if conn is None:
            if self._state is _State.STOPPED:
                raise DirectoryUnavailable("the call directory is stopped")
            raise DirectoryUnavailable(
                f"the call directory is unavailable: no connection to Redis at {self.redis}"
            )
        return conn

    async def _ask(self, what: str, query: Callable[[RedisProtocol], Awaitable[T]]) -> T:
        conn = self._connection()
        try:
            return await query(conn)
        except txredisapi.RedisError as error:
            raise DirectoryUnavailable(
                f"the call directory is unavailable: Redis at {self.redis} failed {what}: {error}"
            ) from None

    async def owners(self, call_id: str) -> dict[str, LegEntry]:
        """The legs of C{call_id}, role -> entry, in any instance; L{DirectoryUnavailable} without Redis."""

        async def query(conn: RedisProtocol) -> dict[str, LegEntry]:
            keys = [self._leg_key(call_id, role.value) for role in Role]
            found = {}
            for row in await _fetch(conn, keys, _LEG_FIELDS[:5]):
                entry = _leg_entry(row[1:6])
                if entry is not None and entry.call_id == call_id:
                    found[entry.role] = entry
            return {role.value: found[role.value] for role in Role if role.value in found}

        return await self._ask("to look up a call", query)

    async def link_of(self, instance_id: str) -> str | None:
        """
        Where C{instance_id}'s media link listens (C{host:port}); "" if the
        instance is live without a link; None if it is gone (its presence expired).
        """

        async def query(conn: RedisProtocol) -> str | None:
            rows = await _fetch(conn, [self._instance_key(instance_id)], ("instance_id", "link"))
            for _, found, link in rows:
                if found == instance_id:
                    return str(link or "")
            return None

        return await self._ask("to look up an instance", query)

    async def legs(self) -> list[LegEntry]:
        """Every leg of the cluster, by call id then role; L{DirectoryUnavailable} without Redis."""
        return await self._ask("to list the legs", self._legs)

    async def _legs(self, conn: RedisProtocol) -> list[LegEntry]:
        entries = []
        async for found in _scan(conn, f"{_glob_escape(self.prefix)}:leg:*", _LEG_FIELDS[:5]):
            for row in found:
                entry = _leg_entry(row[1:6])
                if entry is not None:
                    entries.append(entry)
        return sorted(entries, key=lambda entry: (entry.call_id, entry.role))

    async def instances(self) -> list[InstanceEntry]:
        """The live instances, by instance id, each with its number of legs in the directory."""

        async def query(conn: RedisProtocol) -> list[InstanceEntry]:
            counts: dict[str, int] = {}
            for entry in await self._legs(conn):
                counts[entry.instance_id] = counts.get(entry.instance_id, 0) + 1
            found = []
            async for rows in _scan(conn, f"{_glob_escape(self.prefix)}:instance:*", _INSTANCE_FIELDS):
                for _, instance_id, url, started_at in rows:
                    if None in (instance_id, url, started_at):
                        continue
                    found.append(InstanceEntry(instance_id, url, started_at, counts.get(instance_id, 0)))
            return sorted(found, key=lambda entry: entry.instance_id)

        return await self._ask("to list the instances", query)


async def _waitAtMost(reactor: Any, deferred: Deferred[Any], seconds: float) -> None:
    """
    Wait for C{deferred} at most C{seconds}; never raises, and never cancels
    it (L{audiohangup.lifecycle.within} does): the work goes on, only this
    wait is bounded, as a first connection's sync or a stop's best-effort
    removal must not be cut in the middle. C{deferred} is ours and its
    result is not used afterwards (a failure is consumed: whoever made it
    has logged it).
    """
    done: Deferred[None] = Deferred()

    def settled(result: object) -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    timer = reactor.callLater(seconds, settled, None)
    deferred.addBoth(settled)
    await done
