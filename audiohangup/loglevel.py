# -*- test-case-name: tests.test_config -*-
"""
C{--log-level}: the least severe events the log writes, changed on SIGHUP.

C{twistd} writes every event, debug ones included, to the observers it
begins logging to; it has no level of its own. So the service puts one
filter in front of each of those observers when it starts, and takes it
away when it stops. Only under C{twistd}: a test's process keeps its own.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    globalLogPublisher,
)

#: The levels --log-level takes, least severe first (twisted.logger's names).
LEVELS = ("debug", "info", "warn", "error", "critical")


class LogLevelFilter(Service):
    """
    One level for the whole log, in front of the observers present at start
    (those C{twistd} began logging to), and settable at any time.
    """

    name = "log-level"

    def __init__(self, level: str, *, install: bool, publisher: LogPublisher = globalLogPublisher) -> None:
        self.predicate = LogLevelFilterPredicate(LogLevel.levelWithName(level))
        self.install = install
        self.publisher = publisher
        self._wrapped: list[tuple[ILogObserver, ILogObserver]] = []

    @property
    def level(self) -> str:
        return str(self.predicate.logLevelForNamespace("").name)

    def set(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LogLevel.levelWithName(level))

    def startService(self) -> None:
        super().startService()
        if not self.install:
            return
        # LogPublisher has no public list of its observers; this reads the one Twisted keeps.
        observers: list[Any] = list(getattr(self.publisher, "_observers", []))
        for observer in observers:
            filtered = FilteringLogObserver(observer, [self.predicate])
            self.publisher.removeObserver(observer)
            self.publisher.addObserver(filtered)
            self._wrapped.append((observer, filtered))

    def stopService(self) -> None:
        super().stopService()
        for observer, filtered in self._wrapped:
            self.publisher.removeObserver(filtered)
            self.publisher.addObserver(observer)
        self._wrapped = []
