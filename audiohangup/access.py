# -*- test-case-name: tests.test_access -*-
"""
Who may get in: source address lists, API tokens with their scopes, and the
throttle on failed authentication. Pure decisions, no I/O: the listeners and
the HTTP site ask, and do the closing, counting and logging themselves.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Scope(str, enum.Enum):
    """What a token may do: C{read} every GET, C{control} everything."""

    READ = "read"
    CONTROL = "control"

    def __str__(self) -> str:
        return str(self.value)

    def covers(self, needed: Scope) -> bool:
        return self is Scope.CONTROL or needed is Scope.READ


# Source address lists


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """
    C{"10.0.0.0/8,::1"}: networks (IPv4 or IPv6, a bare address is a /32 or
    /128), or a ValueError naming the entry that is not one.
    """
    networks = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IPv4 or IPv6 address or network (CIDR)") from None
    if not networks:
        raise ValueError("no network given")
    return tuple(networks)


@dataclass(frozen=True)
class SourceACL:
    """The networks a listener accepts connections from; None accepts every source."""

    networks: tuple[IPNetwork, ...] | None = None

    def allows(self, host: str | None) -> bool:
        """
        C{host} is an IP address as Twisted gives it; None (a UNIX socket)
        is always allowed: its file's permissions say who may connect.
        """
        if self.networks is None or host is None:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's IPv4 client
        return any(address in network for network in self.networks)


def is_loopback(host: str) -> bool:
    """True for a loopback address or C{localhost}; False for all interfaces ('', 0.0.0.0, ::)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class LogOncePer:
    """
    Says whether to log about a key now: once per C{interval} per key, with
    a bounded table (the oldest key is forgotten first), so a flood from one
    source is one line a minute and a spray from many cannot grow memory.
    """

    def __init__(self, interval: float = 60.0, max_keys: int = 4096) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[str, float] = OrderedDict()

    def __call__(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True


# Tokens


class TokenFileError(Exception):
    """A tokens file that cannot be read or parsed; the message says where and why, never a token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Tokens:
    """
    The API's bearer tokens and their scopes. Tokens are kept as SHA-256
    digests and every check compares the digest of what was given against
    every stored one with C{hmac.compare_digest}, so the time it takes says
    nothing about any token. No token is ever put into a message.
    """

    def __init__(self, tokens: Iterable[tuple[Scope, str]] = ()) -> None:
        self._digests = [(scope, _digest(token)) for scope, token in tokens]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def counts(self) -> dict[str, int]:
        """Tokens per scope, for the log line after a (re)load."""
        return {scope.value: sum(1 for s, _ in self._digests if s is scope) for scope in Scope}

    def scope_of(self, given: str) -> Scope | None:
        """The scope of a token, or None if it is not one of ours."""
        digest = _digest(given)
        found: Scope | None = None
        for scope, stored in self._digests:  # all of them, whatever matched
            if hmac.compare_digest(digest, stored) and (found is None or scope is Scope.CONTROL):
                found = scope
        return found

    @classmethod
    def parse(cls, text: str, source: str = "tokens file") -> Tokens:
        """
        One C{SCOPE TOKEN} per line, C{#} starts a comment. An error names the
        line, never what is on it.
        """
        tokens: list[tuple[Scope, str]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenFileError(f"{source}, line {number}: expected 'SCOPE TOKEN' (scope read or control)")
            try:
                scope = Scope(parts[0].lower())
            except ValueError:
                raise TokenFileError(f"{source}, line {number}: the scope must be read or control") from None
            tokens.append((scope, parts[1]))
        if not tokens:
            # No token means no check at all: an empty file (or one caught
            # half-written by a reload) must not open the API.
            raise TokenFileError(f"{source} holds no token; the API would be open to anyone")
        return cls(tokens)

    @classmethod
    def load(cls, path: str) -> Tokens:
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            why = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
            raise TokenFileError(f"{path}: cannot be read: {why}") from None
        return cls.parse(text, path)

    def __add__(self, other: Tokens) -> Tokens:
        joined = Tokens()
        joined._digests = self._digests + other._digests
        return joined


# Failed authentication


class AuthThrottle:
    """
    More than C{limit} failed authentications from one address within
    C{window} seconds: that address waits until the window has passed. The
    table of addresses is bounded; the address seen least recently goes first.
    """

    def __init__(self, limit: int = 20, window: float = 60.0, max_addresses: int = 4096) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failed(self, address: str, now: float) -> None:
        times = self._failures.get(address)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.limit + 1)
        times.append(now)
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until C{address} may try again, or None if it may now."""
        times = self._failures.get(address)
        if times is None or len(times) <= self.limit:
            return None
        left = times[0] + self.window - now
        if left <= 0:
            return None
        return left

    @staticmethod
    def header(seconds: float) -> str:
        """A Retry-After value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(seconds)))
