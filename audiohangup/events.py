# -*- test-case-name: tests.test_api,tests.test_records,tests.test_webhooks -*-
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

from audiohangup.interfaces import ILegObserver, IServerLeg
from audiohangup.logs import iso_time
from audiohangup.reasons import HangupCause

__all__ = ["LegEvents", "RecentLegs", "counts_as_leg", "ended_leg"]


def counts_as_leg(connection: IServerLeg) -> bool:
    """
    Whether a connection that ended without becoming a leg (C{connectionEnded})
    still counts as an ended leg where legs are shown: one refused as a
    duplicate named a call, so its call record, its C{leg_ended} webhook and
    the live page's history show it with its reason (the metrics count it
    among the connections without a leg); one without a UUID named nothing.
    """
    return connection.call_id is not None


def ended_leg(leg: IServerLeg) -> dict[str, Any]:
    """How an ended leg went, as the API and the live page's history show it."""
    assert leg.ended_at is not None, "told once the leg is gone"
    return {
        "call_id": leg.call_id,
        "role": leg.role,
        "reason": leg.close_reason,
        "cause": leg.hangup_cause,
        "peer": leg.peer,
        "started_at": iso_time(leg.connected_at),
        "ended_at": iso_time(leg.ended_at),
        "duration": round(leg.ended_at - leg.connected_at, 3),
    }


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

    def legStarted(self, leg: IServerLeg) -> None:
        self._tell("legStarted", lambda observer: observer.legStarted(leg))

    def hangupSent(self, leg: IServerLeg, cause: HangupCause) -> None:
        self._tell("hangupSent", lambda observer: observer.hangupSent(leg, cause))

    def legEnded(self, leg: IServerLeg) -> None:
        self._tell("legEnded", lambda observer: observer.legEnded(leg))

    def callEnded(self, call_id: str) -> None:
        self._tell("callEnded", lambda observer: observer.callEnded(call_id))

    def connectionEnded(self, connection: IServerLeg) -> None:
        self._tell("connectionEnded", lambda observer: observer.connectionEnded(connection))


@implementer(ILegObserver)
class RecentLegs:
    """The last legs that ended, newest first, in memory: the live page's history."""

    def __init__(self, size: int = 100) -> None:
        self._ended: deque[dict[str, Any]] = deque(maxlen=size)

    def legStarted(self, leg: IServerLeg) -> None:
        pass

    def hangupSent(self, leg: IServerLeg, cause: HangupCause) -> None:
        pass

    def legEnded(self, leg: IServerLeg) -> None:
        self._ended.appendleft(ended_leg(leg))

    def callEnded(self, call_id: str) -> None:
        pass

    def connectionEnded(self, connection: IServerLeg) -> None:
        if counts_as_leg(connection):
            self._ended.appendleft(ended_leg(connection))

    def latest(self, limit: int) -> list[dict[str, Any]]:
        return list(islice(self._ended, limit))
