# -*- test-case-name: tests.test_events -*-
"""
Leg lifecycle events, for whoever records or reports them (metrics, call
records, webhooks). Observers are told synchronously on the reactor and must
not block; one observer's bug is logged and never reaches the call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.interfaces import ILeg, ILegObserver
from audiohangup.reasons import HangupCause

__all__ = ["ILegObserver", "LegEvents", "RecentLegs"]


@implementer(ILegObserver)
class LegEvents:
    """Fans each event out to every observer, each guarded on its own."""

    log = Logger()

    def __init__(self) -> None:
        self.observers: list[ILegObserver] = []

    def add(self, observer: ILegObserver) -> None:
        self.observers.append(observer)

    def _tell(self, event: str, call: Callable[[ILegObserver], object]) -> None:
        """C{call} on every observer (a typed call, which mypy checks); C{event} names it in the log."""
        for observer in self.observers:
            try:
                call(observer)
            except Exception:
                self.log.failure("{observer} failed on {event}", observer=type(observer).__name__, event=event)

    def legStarted(self, leg: ILeg) -> None:
        self._tell("legStarted", lambda observer: observer.legStarted(leg))

    def hangupSent(self, leg: ILeg, cause: HangupCause) -> None:
        self._tell("hangupSent", lambda observer: observer.hangupSent(leg, cause))

    def legEnded(self, leg: ILeg) -> None:
        self._tell("legEnded", lambda observer: observer.legEnded(leg))

    def callEnded(self, call_id: str) -> None:
        self._tell("callEnded", lambda observer: observer.callEnded(call_id))

    def connectionEnded(self, connection: ILeg) -> None:
        self._tell("connectionEnded", lambda observer: observer.connectionEnded(connection))


@implementer(ILegObserver)
class RecentLegs:
    """The last legs that ended, newest first, in memory: the live page's history."""

    def __init__(self, size: int = 100) -> None:
        self._ended: deque[dict[str, Any]] = deque(maxlen=size)

    def legStarted(self, leg: ILeg) -> None:
        pass

    def hangupSent(self, leg: ILeg, cause: HangupCause) -> None:
        pass

    def legEnded(self, leg: ILeg) -> None:
        self._ended.appendleft(leg.summary())

    def callEnded(self, call_id: str) -> None:
        pass

    def connectionEnded(self, connection: ILeg) -> None:
        if connection.call_id is not None:  # refused as a duplicate: it named a call
            self._ended.appendleft(connection.summary())

    def latest(self, limit: int) -> list[dict[str, Any]]:
        return list(islice(self._ended, limit))
