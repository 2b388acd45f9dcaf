# -*- test-case-name: tests.test_security -*-
"""
Who may use the API: its tokens with their scopes, and the throttle on
failed authentication. Pure decisions, no I/O: the site and the routes ask,
and do the answering, counting and logging themselves. Where a connection
comes from is L{audiohangup.sources}, which the AudioSocket listeners share.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import os
import stat
from collections import OrderedDict, deque
from collections.abc import Iterable

from audiohangup.credentials import exposed
from audiohangup.reasons import StrEnum
from audiohangup.sources import IPNetwork, address_of, host_of


class Scope(StrEnum):
    """
    What a token may do: C{read} every GET; C{listen} that and hear a call
    live (L{audiohangup.streams.listen}), which is more than reading its
    metadata, so a read token never can; C{control} everything.
    """

    READ = "read"
    LISTEN = "listen"
    CONTROL = "control"

    def covers(self, needed: Scope) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Scope.READ: 0, Scope.LISTEN: 1, Scope.CONTROL: 2}

#: The scopes a tokens file may name, for its errors.
_SCOPE_NAMES = ", ".join(scope.value for scope in Scope)


# Tokens


#: The shortest token taken: 16 random characters are beyond guessing at the
#: throttle's pace, whatever the number of sources.
MIN_TOKEN_LENGTH = 16


#: Why a token is refused for its length (never the token, nor its length).
SHORT_TOKEN = f"a token must be at least {MIN_TOKEN_LENGTH} characters"


class TokenFileError(Exception):
    """A tokens file that cannot be read or parsed; the message says where and why, never a token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def fingerprint(token: str) -> str:
    """
    Which token it was, for a log line: the first 12 hex digits of its
    SHA-256 (C{printf %s TOKEN | sha256sum} tells an operator which of theirs);
    nothing a guesser can use against a token of 16 random characters or more.
    """
    return "sha256:" + _digest(token).hex()[:12]


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
            if hmac.compare_digest(digest, stored) and (found is None or scope.covers(found)):
                found = scope
        return found

    @classmethod
    def parse(cls, text: str, source: str = "tokens file") -> Tokens:
        """
        One C{SCOPE TOKEN} per line; a line whose first character (after
        blanks) is C{#} is a comment, so a C{#} inside a token is part of it.
        A token shorter than L{MIN_TOKEN_LENGTH} is refused. An error names the
        line, never what is on it.
        """
        tokens: list[tuple[Scope, str]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenFileError(
                    f"{source}, line {number}: expected 'SCOPE TOKEN' (scope {_SCOPE_NAMES}; "
                    "# starts a comment only at the start of a line)"
                )
            try:
                scope = Scope(parts[0].lower())
            except ValueError:
                raise TokenFileError(f"{source}, line {number}: the scope must be one of {_SCOPE_NAMES}") from None
            if len(parts[1]) < MIN_TOKEN_LENGTH:
                raise TokenFileError(f"{source}, line {number}: {SHORT_TOKEN}")
            tokens.append((scope, parts[1]))
        if not tokens:
            # No token means no check at all: an empty file (or one caught
            # half-written by a reload) must not open the API.
            raise TokenFileError(f"{source} holds no token; the API would be open to anyone")
        return cls(tokens)

    @classmethod
    def load(cls, path: str, *, insecure: bool = False) -> Tokens:
        """
        The tokens of a file that others cannot read nor its group write
        (0600, or 0640; L{audiohangup.credentials.exposed}), unless C{insecure}
        (--insecure-files) says they may.
        """
        try:
            with open(path, encoding="utf-8") as file:
                mode = os.fstat(file.fileno()).st_mode
                if exposed(mode) and not insecure:
                    raise TokenFileError(
                        f"{path}: mode {stat.S_IMODE(mode):04o} lets others read the tokens or its group "
                        "write them: chmod 600 (or 640) it, or pass --insecure-files"
                    )
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


def source_key(peer: str, forwarded_for: Iterable[str] = (), trusted: tuple[IPNetwork, ...] = ()) -> str:
    """
    The source failed authentications are counted against. The peer, or, when
    the peer is a trusted proxy, the right-most C{X-Forwarded-For} hop that is
    not one (the left of it is whatever the client wrote). Every loopback
    address is one host; IPv6 counts by /64, what one host or site gets.
    """
    address = address_of(peer)
    if address is None:
        return peer
    if any(address in network for network in trusted):
        hops = [hop for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            found = address_of(_without_port(hop))
            if found is None:
                break  # not an address: no proxy of ours wrote it
            address = found
            if not any(address in network for network in trusted):
                break
    if address.is_loopback:
        return "loopback"
    return host_of(address)


def _without_port(hop: str) -> str:
    """An X-Forwarded-For hop without the port some proxies add (C{1.2.3.4:5678}, C{[2001:db8::1]:5678})."""
    hop = hop.strip()
    if hop.startswith("["):
        return hop[1:].split("]", 1)[0]
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


class AuthThrottle:
    """
    More than C{limit} failed authentications from one source within
    C{window} seconds: that source waits until the window has passed.

    The table is bounded: a new source takes the place of the least recent
    one that is not locked, so failures from many others never free a locked
    source early. When every entry is locked, the sources not in the table
    share one more entry: together they get C{limit} failures a window, so
    guesses stay bounded even then, at the price of those sources waiting
    (at most one window after the table frees up).
    """

    def __init__(self, limit: int = 20, window: float = 60.0, max_addresses: int = 4096) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        #: Sources not locked, least recent first: the failure times of each.
        self._counting: OrderedDict[str, deque[float]] = OrderedDict()
        #: Locked sources: until when, and their failure times.
        self._locked: dict[str, tuple[float, deque[float]]] = {}
        self._unlocks: list[tuple[float, str]] = []  # a heap of (until, source)
        self._overflow: deque[float] = deque(maxlen=limit + 1)

    def __len__(self) -> int:
        return len(self._counting) + len(self._locked)

    def __contains__(self, source: str) -> bool:
        return source in self._counting or source in self._locked

    def failed(self, source: str, now: float) -> None:
        self._unlock(now)
        if source in self._locked:
            return  # refused before authentication until then; nothing to add
        times = self._counting.get(source)
        if times is None:
            if len(self) >= self.max_addresses:
                if not self._counting:
                    self._overflow.append(now)
                    return
                self._counting.popitem(last=False)
            times = self._counting[source] = deque(maxlen=self.limit + 1)
        self._counting.move_to_end(source)
        times.append(now)
        until = self._until(times, now)
        if until is not None:
            del self._counting[source]
            self._locked[source] = (until, times)
            heapq.heappush(self._unlocks, (until, source))

    def retry_after(self, source: str, now: float) -> float | None:
        """Seconds until C{source} may try again, or None if it may now."""
        self._unlock(now)
        locked = self._locked.get(source)
        if locked is not None:
            return locked[0] - now
        if source in self._counting:
            return None
        until = self._until(self._overflow, now)
        return None if until is None else until - now

    def _until(self, times: deque[float], now: float) -> float | None:
        """When a source with these failures may try again, if it must wait."""
        if len(times) <= self.limit or times[0] + self.window <= now:
            return None
        return times[0] + self.window

    def _unlock(self, now: float) -> None:
        """Locks that have run out: back among the counting sources, with their failures."""
        while self._unlocks and self._unlocks[0][0] <= now:
            _, source = heapq.heappop(self._unlocks)
            _, times = self._locked.pop(source)
            self._counting[source] = times

    @staticmethod
    def header(seconds: float) -> str:
        """A Retry-After value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(seconds)))
