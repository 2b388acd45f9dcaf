# -*- test-case-name: tests.test_protocol,tests.test_webhooks,tests.test_listeners,tests.test_stream_rules -*-
"""
How audiohangup writes what it tells: times, peers' addresses and URLs as its
log lines, call records, webhooks and API answers show them, and how often a
warning about one thing may repeat. Pure code, no I/O: the callers pass the
time in.

One limiter serves every rate-limited line: a flood (of connections, DTMF
digits, dropped webhook events) must not write more log than it sends.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from hyperlink import URL
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["LogLimit", "WarningCount", "describe_address", "iso_time", "redact"]


def iso_time(seconds: float) -> str:
    """A POSIX time as ISO 8601 in UTC, to the millisecond: what records, webhooks and the API show."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def describe_address(address: IAddress) -> str:
    """C{host:port}, C{[v6]:port} or C{unix:path}: short enough for every log line."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return f"unix:{name.decode() if isinstance(name, bytes) else name}" if name else "unix"
    return str(address)


def redact(url: str) -> str:
    """The URL for logs, the API and the records: no query string or fragment, which may hold a token."""
    return URL.from_text(url).replace(query=(), fragment="").to_text()


class LogLimit:
    """
    Says whether to log about a key now: the first C{burst} lines of each
    C{interval} per key (a window opens with the first line after the last
    one closed), with a bounded table (the oldest key is forgotten first), so
    a flood from one source is a few lines an interval and a spray from many
    cannot grow memory.
    """

    def __init__(self, interval: float = 60.0, burst: int = 1, max_keys: int = 4096) -> None:
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        #: Per key, when its window opened and the lines asked for in it.
        self._windows: OrderedDict[str, list[float]] = OrderedDict()

    def __call__(self, key: str, now: float) -> bool:
        """Whether a line about C{key} may be logged at C{now}; counts it either way."""
        return self.count(key, now) <= self.burst

    def count(self, key: str, now: float) -> int:
        """Count a line about C{key} at C{now}: how many its window has had, this one included."""
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.interval:
            window[1] += 1
            return int(window[1])
        self.restart(key, now)
        return 1

    def closes(self, key: str) -> float:
        """When C{key}'s window closes (a key never counted: at once)."""
        window = self._windows.get(key)
        return -float("inf") if window is None else window[0] + self.interval

    def restart(self, key: str, now: float) -> None:
        """Open C{key}'s window at C{now}, with the line just logged (a summary) in it."""
        self._windows[key] = [now, 1]
        self._windows.move_to_end(key)
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)


class WarningCount:
    """
    Warn lines about one kind of event: the first at once, then at most one
    an interval, saying how many were not logged in it (a timer says so at
    the end of the interval, so the count is never held back for ever).
    """

    def __init__(self, log: Logger, clock: IReactorTime, summary: str, interval: float) -> None:
        self.log = log
        self.clock = clock
        #: The line that counts what was not logged; its fields C{count} and C{interval}.
        self.summary = summary
        self.limit = LogLimit(interval)
        self.suppressed = 0
        self.timer: IDelayedCall | None = None

    def warn(self, text: str, **fields: Any) -> None:
        now = self.clock.seconds()
        if self.limit("", now):
            self.log.warn(text, **fields)
            return
        self.suppressed += 1
        if self.timer is None:
            closes = self.limit.closes("")
            self.timer = self.clock.callLater(max(0.0, closes - now), self.flush)

    def flush(self) -> None:
        """Log the count of lines not logged, if any (at the end of an interval, or when stopping)."""
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        if self.suppressed:
            self.log.warn(self.summary, count=self.suppressed, interval=self.limit.interval)
            self.suppressed = 0
            self.limit.restart("", self.clock.seconds())

